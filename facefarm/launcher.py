"""``facefarm worker``: one Celery worker process per GPU client, with MPS when GPUs are shared.

The parent never touches CUDA (NVML only), so each child initialises its own context after it
starts. SIGTERM/SIGINT are forwarded as SIGTERM (Celery's warm shutdown: the running chunk finishes
or is handed back); a second signal forwards SIGQUIT (cold shutdown). The MPS daemon is stopped on
the way out only if this launcher started it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from shared.cpus import usable_cpus
from shared.errors import ConfigError
from shared.names import CHECK_QUEUE, CPU_QUEUE
from shared.settings import Settings
from worker.runtime.mps import (
    ClientEnv,
    MpsDaemon,
    build_client_envs,
    build_worker_command,
    is_mps_daemon_running,
    resolve_mps_mode,
)

log = logging.getLogger(__name__)

POLL_S = 0.5
# plan and merge tasks live in the dispatcher's Celery app; the render app does not register them
DISPATCHER_APP = "dispatcher.celery_app"
DISPATCHER_QUEUES = (CPU_QUEUE,)
DISPATCHER_NODE = "dispatch-0@%h"
# the input check runs the render app's face detector, but on the CPU, in a process of its own so a
# bad photo is refused in a second even while every GPU client is busy with a chunk
CHECK_QUEUES = (CHECK_QUEUE,)
CHECK_NODE = "check-0@%h"


@dataclass(frozen=True)
class GpuInfo:
    """A GPU as NVML lists it (physical index, the order CUDA_VISIBLE_DEVICES uses by default)."""

    index: int
    name: str
    total_bytes: int
    uuid: str


def discover_gpus() -> list[GpuInfo]:
    """Every GPU NVML can see; empty when there is no driver or no NVML (a CPU worker then)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError or NVMLError: no GPU here
        log.info("no NVIDIA driver found (%s): starting a CPU worker", exc)
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                )
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def select_gpus(spec: str, available: Sequence[GpuInfo]) -> list[GpuInfo]:
    """``all``, ``none`` or a comma list of physical indices, checked against what exists."""
    spec = spec.strip().lower()
    if spec == "none":
        return []
    if spec == "all":
        return list(available)
    by_index = {g.index: g for g in available}
    chosen = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if not part.isdigit():
            raise ConfigError(f"--gpus {spec!r}: write all, none or indices like 0,1")
        if int(part) not in by_index:
            seen = ",".join(str(i) for i in by_index) or "none"
            raise ConfigError(f"--gpus {spec!r}: GPU {part} does not exist (NVML lists: {seen})")
        chosen.append(by_index[int(part)])
    return chosen


def split_queues(queues: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """``(render queues, dispatcher queues, check queues)``: each queue goes to the process kind
    that runs its tasks (GPU clients, the dispatcher app, the CPU-only check process)."""
    render = [q for q in queues if q not in DISPATCHER_QUEUES and q not in CHECK_QUEUES]
    dispatch = [q for q in queues if q in DISPATCHER_QUEUES]
    check = [q for q in queues if q in CHECK_QUEUES]
    return render, dispatch, check


def dispatcher_client() -> ClientEnv:
    """The one CPU process that runs plan/merge tasks on this node (never touches a GPU)."""
    return ClientEnv(
        gpu=None, slot=0, node_name=DISPATCHER_NODE, mps_mode="off", env={"CUDA_VISIBLE_DEVICES": ""}
    )


def check_client() -> ClientEnv:
    """The one CPU-only process that runs the input check (face detector) on this node."""
    return ClientEnv(
        gpu=None,
        slot=0,
        node_name=CHECK_NODE,
        mps_mode="off",
        env={"CUDA_VISIBLE_DEVICES": "", "FACEFARM_DEVICE": "cpu"},
    )


def unblock_workers(settings: Settings, node_names: Sequence[str]) -> None:
    """Clear the 'blocked after N failures' mark of these workers in the state store."""
    from shared import state

    store = state.JobStore.from_settings(settings)
    try:
        for node in node_names:
            store.unblock_worker(node)
            log.info("unblocked worker %s", node)
    finally:
        store.close()


class _Supervisor:
    """Child processes, signal forwarding and the wait for all of them to exit."""

    def __init__(self) -> None:
        self.children: list[tuple[ClientEnv, subprocess.Popen[bytes]]] = []
        self.signals_seen = 0

    def start(self, client: ClientEnv, command: list[str], env: dict[str, str]) -> None:
        log.info("starting %s: %s", client.node_name, " ".join(command))
        # own session: a terminal's Ctrl-C reaches only us, and we forward one clean signal
        proc = subprocess.Popen(command, env=env, start_new_session=True)
        self.children.append((client, proc))

    def forward(self, signum: int, _frame: FrameType | None = None) -> None:
        self.signals_seen += 1
        sent = signal.SIGTERM if self.signals_seen == 1 else signal.SIGQUIT
        log.info(
            "received %s: sending %s to %d worker(s)", signal.Signals(signum).name, sent.name, self.alive
        )
        for _, proc in self.children:
            if proc.poll() is None:
                proc.send_signal(sent)

    @property
    def alive(self) -> int:
        return sum(1 for _, proc in self.children if proc.poll() is None)

    def wait(self) -> int:
        reported: set[int] = set()
        while True:
            for client, proc in self.children:
                rc = proc.poll()
                if rc is not None and proc.pid not in reported:
                    reported.add(proc.pid)
                    level = logging.INFO if rc == 0 or self.signals_seen else logging.ERROR
                    log.log(level, "worker %s exited with %s", client.node_name, rc)
            if self.alive == 0:
                break
            time.sleep(POLL_S)
        codes = [proc.returncode for _, proc in self.children]
        if self.signals_seen:
            return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1
        return next((c for c in codes if c != 0), 0)


def run_workers(
    settings: Settings,
    *,
    gpus: str,
    per_gpu: int,
    mps: str,
    queues: list[str],
    unblock: bool = False,
) -> int:
    """Run the workers until they exit; returns the exit code for the CLI."""
    if not queues:
        raise ConfigError("--queues must name at least one queue (e.g. gpu,cpu)")
    render_queues, dispatch_queues, check_queues = split_queues(queues)
    renders = bool(render_queues)
    chosen = select_gpus(gpus, discover_gpus() if renders and gpus.strip().lower() != "none" else [])
    daemon_running = is_mps_daemon_running(settings.mps_pipe_dir)
    clients = []
    if renders:
        clients = build_client_envs(
            [g.index for g in chosen],
            per_gpu,
            mps,
            settings,
            mps_daemon_running=daemon_running,
            total_bytes_by_gpu={g.index: g.total_bytes for g in chosen},
            cpus=usable_cpus(),
        )
    if unblock:  # clear this node's failure blocks and exit (the CLI's contract)
        host = socket.gethostname()
        unblock_workers(settings, [c.node_name.replace("%h", host) for c in clients])
        return 0

    base_env = dict(os.environ)  # children inherit our environment plus their own pins
    daemon = None
    if chosen and resolve_mps_mode(mps, per_gpu, mps_daemon_running=daemon_running) == "managed":
        daemon = MpsDaemon(settings, base_env)
        daemon.start()
    supervisor = _Supervisor()
    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, supervisor.forward)
        for client in clients:
            command = build_worker_command(
                client, render_queues, python=sys.executable, log_level=settings.log_level
            )
            supervisor.start(client, command, {**base_env, **client.env})
        if dispatch_queues:
            client = dispatcher_client()
            command = build_worker_command(
                client,
                dispatch_queues,
                python=sys.executable,
                log_level=settings.log_level,
                app=DISPATCHER_APP,
            )
            supervisor.start(client, command, {**base_env, **client.env})
        if check_queues:
            client = check_client()
            command = build_worker_command(
                client, check_queues, python=sys.executable, log_level=settings.log_level
            )
            supervisor.start(client, command, {**base_env, **client.env})
        return supervisor.wait()
    finally:
        if supervisor.alive:
            supervisor.forward(signal.SIGTERM)
            supervisor.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if daemon is not None:
            daemon.stop()
