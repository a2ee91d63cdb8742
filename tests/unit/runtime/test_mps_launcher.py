"""Client environments per --mps mode, worker commands, GPU selection and signal forwarding.

No GPU needed: every decision is a pure function; the supervisor is driven with real child
processes that stand in for Celery workers.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from facefarm.launcher import GpuInfo, _Supervisor, select_gpus
from shared.errors import ConfigError
from shared.settings import Settings
from worker.runtime.mps import (
    CONTEXT_RESERVE_BYTES,
    ClientEnv,
    MpsDaemon,
    build_client_envs,
    build_daemon_quit_command,
    build_daemon_start_command,
    build_worker_command,
    is_mps_daemon_running,
    mps_control_alive,
    resolve_mps_mode,
)
from worker.runtime.sizes import GIB, MIB, parse_mps_limit

H100 = 80 * GIB
MPS_VARS = {
    "CUDA_MPS_PIPE_DIRECTORY",
    "CUDA_MPS_LOG_DIRECTORY",
    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
    "FACEFARM_MPS_MEM_LIMIT",
}


def settings(**overrides: object) -> Settings:
    base = {"mps_pipe_dir": Path("/run/ff-mps"), "mps_log_dir": Path("/run/ff-mps-log")}
    return Settings(**{**base, **overrides})


def test_auto_mode_manages_mps_only_when_a_gpu_is_shared() -> None:
    assert resolve_mps_mode("auto", 1, mps_daemon_running=False) == "off"
    assert resolve_mps_mode("auto", 4, mps_daemon_running=False) == "managed"
    assert resolve_mps_mode("auto", 4, mps_daemon_running=True) == "external"
    assert resolve_mps_mode("managed", 1, mps_daemon_running=True) == "managed"
    with pytest.raises(ConfigError, match="--mps 'on'"):
        resolve_mps_mode("on", 2, mps_daemon_running=False)


def test_managed_mode_pins_each_client_with_a_share_of_compute_and_a_hard_limit() -> None:
    clients = build_client_envs(
        [0, 1], 4, "managed", settings(), mps_daemon_running=False, total_bytes_by_gpu={0: H100, 1: H100}
    )
    assert [c.node_name for c in clients] == [f"gpu{g}-{k}@%h" for g in (0, 1) for k in range(4)]
    limit = int(H100 * 0.9) // 4
    for client in clients:
        env = client.env
        assert env["CUDA_VISIBLE_DEVICES"] == str(client.gpu)
        assert env["FACEFARM_DEVICE"] == "cuda:0"
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/run/ff-mps"
        assert env["CUDA_MPS_LOG_DIRECTORY"] == "/run/ff-mps-log"
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
        assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={limit // MIB}M"
        assert env["FACEFARM_MPS_MEM_LIMIT"] == env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]
        assert parse_mps_limit(env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]) <= limit
        assert client.mps_mode == "managed"
    assert sum(c.mem_limit_bytes or 0 for c in clients if c.gpu == 0) <= H100


def test_an_explicit_budget_becomes_the_limit_plus_the_context_and_must_fit_the_card() -> None:
    (client,) = build_client_envs(
        [0], 1, "managed", settings(gpu_budget="2GiB"), mps_daemon_running=False, total_bytes_by_gpu={0: H100}
    )
    assert client.mem_limit_bytes == 2 * GIB + CONTEXT_RESERVE_BYTES
    with pytest.raises(ConfigError, match="lower --per-gpu"):
        build_client_envs(
            [0],
            8,
            "managed",
            settings(gpu_budget="12GiB"),
            mps_daemon_running=False,
            total_bytes_by_gpu={0: H100},
        )


def test_external_mode_joins_the_configured_daemon_without_limits() -> None:
    clients = build_client_envs([3], 2, "external", settings(), mps_daemon_running=True)
    for client in clients:
        assert client.env["CUDA_MPS_PIPE_DIRECTORY"] == "/run/ff-mps"
        assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in client.env
        assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in client.env
        assert client.env["CUDA_VISIBLE_DEVICES"] == "3"


def test_off_mode_sets_no_mps_variables() -> None:
    clients = build_client_envs([0], 2, "off", settings(), mps_daemon_running=False)
    assert len(clients) == 2
    for client in clients:
        assert not MPS_VARS & set(client.env)
        assert client.env == {"CUDA_VISIBLE_DEVICES": "0", "FACEFARM_DEVICE": "cuda:0"}


def test_no_gpu_gives_one_cpu_worker_that_cannot_see_gpus() -> None:
    (client,) = build_client_envs([], 4, "auto", settings(), mps_daemon_running=False)
    assert client.gpu is None and client.mps_mode == "off"
    assert client.env == {"CUDA_VISIBLE_DEVICES": "", "FACEFARM_DEVICE": "cpu"}


def test_the_worker_command_is_one_prefork_process_per_client() -> None:
    client = ClientEnv(gpu=1, slot=2, node_name="gpu1-2@%h", mps_mode="off")
    command = build_worker_command(client, ["gpu", "cpu"], python="/venv/bin/python", log_level="INFO")
    assert command == [
        "/venv/bin/python", "-m", "celery", "-A", "worker.celery_app", "worker", "-P", "prefork", "-c", "1",
        "-Q", "gpu,cpu", "-n", "gpu1-2@%h", "-E", "--loglevel", "INFO",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="--queues"):
        build_worker_command(client, [], python="python", log_level="INFO")


def test_gpu_selection_checks_what_nvml_lists() -> None:
    gpus = [GpuInfo(0, "H100", H100, "GPU-a"), GpuInfo(1, "H100", H100, "GPU-b")]
    assert select_gpus("all", gpus) == gpus
    assert select_gpus("none", gpus) == []
    assert select_gpus("1", gpus) == [gpus[1]]
    with pytest.raises(ConfigError, match="GPU 2 does not exist"):
        select_gpus("0,2", gpus)
    with pytest.raises(ConfigError, match="write all, none"):
        select_gpus("first", gpus)


def test_a_running_daemon_is_reused_and_never_stopped_by_us(tmp_path: Path) -> None:
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    assert not is_mps_daemon_running(pipe, control_alive=lambda: True)
    (pipe / "control").touch()
    assert not is_mps_daemon_running(pipe, control_alive=lambda: False)  # a stale pipe
    assert is_mps_daemon_running(pipe, control_alive=lambda: True)
    daemon = MpsDaemon(
        settings(mps_pipe_dir=pipe, mps_log_dir=tmp_path / "log"),
        {"PATH": "/nonexistent"},
        control_alive=lambda: True,
    )
    daemon.start()  # reuses: does not even look for nvidia-cuda-mps-control
    assert daemon.started_by_us is False
    daemon.stop()  # not ours: no quit is sent (the PATH has no control binary to send it)
    assert build_daemon_start_command() == ["nvidia-cuda-mps-control", "-d"]
    assert build_daemon_quit_command() == (["nvidia-cuda-mps-control"], "quit\n")


def test_starting_a_daemon_without_the_driver_tools_is_a_clear_error(tmp_path: Path) -> None:
    daemon = MpsDaemon(
        settings(mps_pipe_dir=tmp_path / "pipe", mps_log_dir=tmp_path / "log"), {"PATH": str(tmp_path)}
    )
    assert not mps_control_alive(tmp_path)  # an empty /proc: no control process
    with pytest.raises(ConfigError, match="nvidia-cuda-mps-control"):
        daemon.start()


CHILD = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))  # Celery's warm shutdown ends cleanly
print("ready", flush=True)
time.sleep(60)
"""


def test_the_supervisor_forwards_sigterm_and_exits_when_the_workers_exit() -> None:
    supervisor = _Supervisor()
    for slot in range(2):
        client = ClientEnv(gpu=None, slot=slot, node_name=f"cpu0-{slot}@%h", mps_mode="off")
        supervisor.start(client, [sys.executable, "-c", CHILD], {})
    time.sleep(1.0)
    assert supervisor.alive == 2
    started = time.monotonic()
    supervisor.forward(signal.SIGTERM)
    assert supervisor.wait() == 0
    assert time.monotonic() - started < 30
    assert supervisor.alive == 0


def test_a_worker_that_dies_on_its_own_gives_a_failing_exit_code() -> None:
    supervisor = _Supervisor()
    client = ClientEnv(gpu=None, slot=0, node_name="cpu0-0@%h", mps_mode="off")
    supervisor.start(client, [sys.executable, "-c", "raise SystemExit(3)"], {})
    assert supervisor.wait() == 3


def test_the_cpu_queue_goes_to_the_dispatcher_app_that_registers_plan_and_merge() -> None:
    from facefarm.launcher import DISPATCHER_APP, dispatcher_client, split_queues

    assert split_queues(["gpu"]) == (["gpu"], [], [])
    assert split_queues(["cpu"]) == ([], ["cpu"], [])
    assert split_queues(["gpu", "cpu"]) == (["gpu"], ["cpu"], [])
    assert split_queues(["gpu", "check", "cpu"]) == (["gpu"], ["cpu"], ["check"])
    client = dispatcher_client()
    command = build_worker_command(client, ["cpu"], python="py", log_level="INFO", app=DISPATCHER_APP)
    assert command[command.index("-A") + 1] == "dispatcher.celery_app"
    # a CPU render worker on the same node is cpu0-0@%h: the names must not clash
    assert command[command.index("-n") + 1] == "dispatch-0@%h"
    assert client.env == {"CUDA_VISIBLE_DEVICES": ""}


def test_the_check_queue_gets_one_cpu_only_render_app_process_named_apart_from_the_gpu_clients() -> None:
    from facefarm.launcher import check_client

    client = check_client()
    command = build_worker_command(client, ["check"], python="py", log_level="INFO")
    assert command[command.index("-A") + 1] == "worker.celery_app"  # the app that knows the face check
    assert command[command.index("-Q") + 1] == "check"
    assert command[command.index("-n") + 1] == "check-0@%h"
    assert client.env == {"CUDA_VISIBLE_DEVICES": "", "FACEFARM_DEVICE": "cpu"}  # never touches a GPU
