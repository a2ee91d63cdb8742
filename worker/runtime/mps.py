"""GPU clients and NVIDIA MPS: one environment per Celery worker process, and the control daemon.

Everything that decides (mode, per-client limits, environments, command lines) is a pure
function, tested without a GPU. Only ``MpsDaemon`` runs commands. This module does not import torch:
the launcher parent must never touch CUDA before its children start.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shared.cpus import format_cpu_list, split_cpus
from shared.errors import ConfigError
from worker.runtime.sizes import MIB, format_bytes, parse_bytes

if TYPE_CHECKING:  # settings are only read, never built, here
    from shared.settings import Settings

log = logging.getLogger(__name__)

MPS_MODES = ("auto", "managed", "external", "off")
MPS_CONTROL = "nvidia-cuda-mps-control"
# The MPS limit also counts the CUDA context and internal allocations (measured: 0=4G left 3.7 GiB
# free), so an explicit budget gets this much on top when it becomes a limit.
CONTEXT_RESERVE_BYTES = 512 * MIB


@dataclass(frozen=True)
class ClientEnv:
    """One Celery worker process: which GPU, which slot on it, its node name and extra env."""

    gpu: int | None  # physical index (NVML order); None for a CPU worker
    slot: int
    node_name: str
    mps_mode: str  # the resolved mode: managed | external | off
    env: dict[str, str] = field(default_factory=dict)
    mem_limit_bytes: int | None = None  # the MPS hard limit in managed mode


def resolve_mps_mode(mode: str, per_gpu: int, *, mps_daemon_running: bool) -> str:
    """``auto``: our own daemon when several clients share a GPU, the running one if there is one.

    A daemon already listening on the pipe directory captures every CUDA client that uses it, so
    with one present ``auto`` joins it (``external``) rather than pretending MPS is off.
    """
    if mode not in MPS_MODES:
        raise ConfigError(f"--mps {mode!r} is not one of {', '.join(MPS_MODES)}")
    if mode != "auto":
        return mode
    if mps_daemon_running:
        return "external"
    return "managed" if per_gpu > 1 else "off"


def format_mps_size(nbytes: int) -> str:
    """Whole MiB in the ``M`` form MPS understands (rounded down, so the limit never grows)."""
    return f"{nbytes // MIB}M"


def client_limit_bytes(settings: Settings, per_gpu: int, total_bytes: int) -> int:
    """The hard per-client limit in managed mode.

    With ``gpu_budget=auto``: ``budget_free_fraction`` of the card split evenly (as NVIDIA's device
    plugin does). With an explicit budget: that budget plus the context reserve, which must fit
    ``per_gpu`` times on the card.
    """
    if settings.gpu_budget.strip().lower() == "auto":
        return int(total_bytes * settings.budget_free_fraction) // per_gpu
    limit = parse_bytes(settings.gpu_budget) + CONTEXT_RESERVE_BYTES
    if limit * per_gpu > total_bytes:
        raise ConfigError(
            f"{per_gpu} clients x (FACEFARM_GPU_BUDGET={settings.gpu_budget} + "
            f"{format_bytes(CONTEXT_RESERVE_BYTES)} context) exceed the GPU's {format_bytes(total_bytes)}: "
            "lower --per-gpu or the budget"
        )
    return limit


def build_client_envs(
    gpus: Sequence[int],
    per_gpu: int,
    mps_mode: str,
    settings: Settings,
    *,
    mps_daemon_running: bool,
    total_bytes_by_gpu: Mapping[int, int] | None = None,
    cpus: Sequence[int] | None = None,
) -> list[ClientEnv]:
    """One environment per GPU client (or a single CPU worker when ``gpus`` is empty).

    ``cpus`` (the node's usable CPUs) is split into one contiguous block per GPU client, passed as
    ``FACEFARM_CPU_AFFINITY``: clients on one node then size their thread pools to their share
    instead of each assuming the whole machine.

    Each client is pinned with ``CUDA_VISIBLE_DEVICES`` and computes on ``cuda:0``. In ``managed``
    mode it gets ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` = 100/K and a hard
    ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` = ``0=<limit>`` (mirrored into ``FACEFARM_MPS_MEM_LIMIT``
    so the worker's budget follows it); ``external`` joins the configured pipe directory and sets
    no limits; ``off`` sets no MPS variables.
    """
    if per_gpu < 1:
        raise ConfigError(f"--per-gpu must be at least 1, got {per_gpu}")
    if not gpus:
        return [
            ClientEnv(
                gpu=None,
                slot=0,
                node_name="cpu0-0@%h",
                mps_mode="off",
                env={"CUDA_VISIBLE_DEVICES": "", "FACEFARM_DEVICE": "cpu"},
            )
        ]
    mode = resolve_mps_mode(mps_mode, per_gpu, mps_daemon_running=mps_daemon_running)
    totals = dict(total_bytes_by_gpu or {})
    clients = []
    shares = split_cpus(cpus, len(gpus) * per_gpu) if cpus else None
    for gpu in gpus:
        limit = None
        if mode == "managed":
            if gpu not in totals:
                raise ConfigError(f"managed MPS needs GPU {gpu}'s memory size to set per-client limits")
            limit = client_limit_bytes(settings, per_gpu, totals[gpu])
        for slot in range(per_gpu):
            env = {"CUDA_VISIBLE_DEVICES": str(gpu), "FACEFARM_DEVICE": "cuda:0"}
            if mode in ("managed", "external"):
                env["CUDA_MPS_PIPE_DIRECTORY"] = str(settings.mps_pipe_dir)
                env["CUDA_MPS_LOG_DIRECTORY"] = str(settings.mps_log_dir)
            if mode == "managed" and limit is not None:
                mps_limit = f"0={format_mps_size(limit)}"
                env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(1, 100 // per_gpu))
                env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = mps_limit
                env["FACEFARM_MPS_MEM_LIMIT"] = mps_limit
            if shares is not None:
                env["FACEFARM_CPU_AFFINITY"] = format_cpu_list(shares[len(clients)])
            clients.append(
                ClientEnv(
                    gpu=gpu,
                    slot=slot,
                    node_name=f"gpu{gpu}-{slot}@%h",
                    mps_mode=mode,
                    env=env,
                    mem_limit_bytes=limit,
                )
            )
    return clients


def build_worker_command(
    client: ClientEnv,
    queues: Sequence[str],
    *,
    python: str,
    log_level: str,
    app: str = "worker.celery_app",
) -> list[str]:
    """The Celery worker for one client: prefork, one pool process, its own node name, events on.

    ``app`` is the Celery app module whose tasks the queues carry (the launcher passes the
    dispatcher's for the ``cpu`` queue: the render app does not know plan/merge tasks).
    """
    if not queues:
        raise ConfigError("--queues must name at least one queue (e.g. gpu,cpu)")
    return [
        python,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-P",
        "prefork",
        "-c",
        "1",
        "-Q",
        ",".join(queues),
        "-n",
        client.node_name,
        "-E",
        "--loglevel",
        log_level,
    ]


def daemon_env(settings: Settings) -> dict[str, str]:
    """The directories the control daemon and every client must agree on."""
    return {
        "CUDA_MPS_PIPE_DIRECTORY": str(settings.mps_pipe_dir),
        "CUDA_MPS_LOG_DIRECTORY": str(settings.mps_log_dir),
    }


def mps_control_alive(proc_root: Path = Path("/proc")) -> bool:
    """Whether an ``nvidia-cuda-mps-control`` process runs on this host (read-only /proc scan)."""
    for comm in proc_root.glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == MPS_CONTROL[:15]:  # the kernel truncates comm to 15 chars
                return True
        except OSError:
            continue
    return False


def is_mps_daemon_running(pipe_dir: Path, *, control_alive: Callable[[], bool] = mps_control_alive) -> bool:
    """A control daemon listens on ``pipe_dir``: its ``control`` pipe is there and the process lives.

    The pipe alone can be stale (a daemon that died leaves it behind), and we never write to a
    daemon's pipe just to probe it.
    """
    return (pipe_dir / "control").exists() and control_alive()


def build_daemon_start_command() -> list[str]:
    return [MPS_CONTROL, "-d"]


def build_daemon_quit_command() -> tuple[list[str], str]:
    """The command and its stdin: ``echo quit | nvidia-cuda-mps-control``."""
    return [MPS_CONTROL], "quit\n"


class MpsDaemon:
    """Starts the control daemon unless one is running, and stops it only if we started it."""

    def __init__(
        self,
        settings: Settings,
        base_env: Mapping[str, str],
        *,
        control_alive: Callable[[], bool] = mps_control_alive,
    ) -> None:
        self._settings = settings
        self._env = {**base_env, **daemon_env(settings)}
        self._control_alive = control_alive
        self.started_by_us = False

    def start(self, timeout_s: float = 10.0) -> None:
        pipe_dir = self._settings.mps_pipe_dir
        if is_mps_daemon_running(pipe_dir, control_alive=self._control_alive):
            log.info("reusing the MPS control daemon at %s", pipe_dir)
            return
        pipe_dir.mkdir(parents=True, exist_ok=True)
        self._settings.mps_log_dir.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(
                build_daemon_start_command(), env=self._env, capture_output=True, text=True, timeout=timeout_s
            )
        except FileNotFoundError as exc:
            raise ConfigError(
                f"--mps managed needs {MPS_CONTROL} on PATH (NVIDIA driver utilities); use --mps off"
            ) from exc
        if done.returncode != 0:
            raise ConfigError(f"{MPS_CONTROL} -d failed: {done.stderr.strip() or done.stdout.strip()}")
        self.started_by_us = True
        log.info("started the MPS control daemon (pipe %s)", pipe_dir)

    def stop(self, timeout_s: float = 30.0) -> None:
        if not self.started_by_us:
            return
        command, stdin = build_daemon_quit_command()
        subprocess.run(command, input=stdin, env=self._env, capture_output=True, text=True, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while is_mps_daemon_running(self._settings.mps_pipe_dir, control_alive=self._control_alive):
            if time.monotonic() > deadline:
                log.warning(
                    "the MPS control daemon at %s did not stop within %s s",
                    self._settings.mps_pipe_dir,
                    timeout_s,
                )
                break
            time.sleep(0.2)
        self.started_by_us = False
        log.info("stopped the MPS control daemon")
