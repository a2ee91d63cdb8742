"""CPU shares for GPU clients: cpulists, contiguous splits, the env each client gets, the pin."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.cpus import format_cpu_list, parse_cpu_list, split_cpus, usable_cpu_count
from shared.errors import ConfigError
from shared.settings import Settings
from worker.runtime.mps import build_client_envs


def test_cpulists_read_and_write_as_the_kernel_does() -> None:
    assert parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert format_cpu_list([5, 0, 1, 2, 10, 11]) == "0-2,5,10-11"
    assert parse_cpu_list(format_cpu_list(list(range(64)))) == list(range(64))
    for bad in ("", "a", "3-1", "-2"):
        with pytest.raises(ConfigError):
            parse_cpu_list(bad)


def test_splits_are_contiguous_disjoint_and_cover_every_cpu() -> None:
    blocks = split_cpus(range(32), 2)
    assert blocks == [list(range(16)), list(range(16, 32))]
    uneven = split_cpus(range(10), 4)
    assert [len(b) for b in uneven] == [3, 3, 2, 2]
    assert sorted(c for b in uneven for c in b) == list(range(10))
    assert split_cpus([0, 1], 3) == [[0], [1], [0]]  # more clients than CPUs: shared, never empty


def test_each_gpu_client_gets_its_own_block_and_none_without_a_cpu_list() -> None:
    settings = Settings(mps_pipe_dir="/tmp/p", mps_log_dir="/tmp/l")
    clients = build_client_envs([0, 1], 2, "off", settings, mps_daemon_running=False, cpus=range(32))
    assert [c.env["FACEFARM_CPU_AFFINITY"] for c in clients] == ["0-7", "8-15", "16-23", "24-31"]
    plain = build_client_envs([0], 1, "off", settings, mps_daemon_running=False)
    assert "FACEFARM_CPU_AFFINITY" not in plain[0].env


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity API")
def test_a_pinned_process_and_its_children_see_only_their_share() -> None:
    first = os.sched_getaffinity(0)
    cpu = min(first)
    code = (
        "from shared.cpus import pin_to, usable_cpu_count; import subprocess, sys;"
        f"pin_to('{cpu}'); print(usable_cpu_count());"
        "print(subprocess.run([sys.executable, '-c', 'import os; print(len(os.sched_getaffinity(0)))'],"
        " capture_output=True, text=True).stdout.strip())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["1", "1"]
    assert usable_cpu_count() == len(first)  # this process was not touched
