"""Test-only failure injection: make a chosen chunk or merge raise, die, or run slowly.

A TEST HOOK, off unless ``FACEFARM_FAULT_INJECTION`` is set. The reliability tests use it to prove
that poison chunks end in a FAILED job, that a killed merge re-runs, and that a chunk killed at a
random frame renders identically on its redelivery. Grammar (several faults separated by ``;``)::

    ACTION:TARGET[,key=value...]
    ACTION  raise (a RuntimeError, i.e. an unexpected bug) | exit (SIGKILL of this process)
            | sleep (``s`` seconds per rendered batch: slows a chunk so a test can kill it mid-way)
    TARGET  chunk | merge
    keys    index=N   only chunk N            video=NAME  only jobs whose uploaded video is NAME
            worker=W  only on worker W (the node name before '@')
            times=K   only the first K occurrences per job (needs a counter; default: always)
            s=SECONDS the delay of ``sleep``

e.g. ``raise:chunk,index=1,video=poison.mp4`` or ``exit:merge,video=mergekill.mp4,times=1``.
"""

from __future__ import annotations

import fnmatch
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import ConfigError

ACTIONS = ("raise", "exit", "sleep")
TARGETS = ("chunk", "merge")
KEYS = ("index", "video", "worker", "times", "s")


@dataclass(frozen=True)
class Fault:
    """One parsed fault: what to do, where, and the filters that must all match."""

    action: str
    target: str
    index: int | None = None
    video: str | None = None
    worker: str | None = None
    times: int | None = None
    sleep_s: float = 0.0

    @property
    def name(self) -> str:
        """A stable id, used for the per-job occurrence counter of ``times``."""
        return f"{self.action}:{self.target}:{self.index}:{self.video}:{self.worker}"

    def matches(
        self, *, target: str, video: str | None, worker: str | None, index: int | None = None
    ) -> bool:
        if target != self.target:
            return False
        if self.index is not None and index != self.index:
            return False
        if self.video is not None and not fnmatch.fnmatchcase(video or "", self.video):
            return False
        worker_node = (worker or "").split("@")[0]
        return self.worker is None or fnmatch.fnmatchcase(worker_node, self.worker)


def parse_faults(text: str | None) -> tuple[Fault, ...]:
    """``FACEFARM_FAULT_INJECTION`` as faults; ConfigError names the part that is wrong."""
    faults: list[Fault] = []
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        head, _, rest = part.partition(",")
        action, sep, target = head.partition(":")
        if not sep or action not in ACTIONS or target not in TARGETS:
            raise ConfigError(
                f"FACEFARM_FAULT_INJECTION: {part!r} must start with ACTION:TARGET, "
                f"ACTION one of {'/'.join(ACTIONS)}, TARGET one of {'/'.join(TARGETS)}"
            )
        values: dict[str, str] = {}
        for item in filter(None, (i.strip() for i in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or key not in KEYS or not value:
                raise ConfigError(
                    f"FACEFARM_FAULT_INJECTION: {item!r} in {part!r}: use key=value, key in {KEYS}"
                )
            values[key] = value
        try:
            faults.append(
                Fault(
                    action=action,
                    target=target,
                    index=int(values["index"]) if "index" in values else None,
                    video=values.get("video"),
                    worker=values.get("worker"),
                    times=int(values["times"]) if "times" in values else None,
                    sleep_s=float(values.get("s", "0.2" if action == "sleep" else "0")),
                )
            )
        except ValueError as exc:
            raise ConfigError(f"FACEFARM_FAULT_INJECTION: {part!r}: {exc}") from exc
    return tuple(faults)


def fire(fault: Fault, where: str) -> None:
    """Do what ``fault`` says (``sleep`` is applied per batch by the caller, not here)."""
    if fault.action == "raise":
        raise RuntimeError(f"injected fault ({fault.name}) in {where}")
    if fault.action == "exit":
        os.kill(os.getpid(), signal.SIGKILL)


def select(
    faults: tuple[Fault, ...],
    *,
    target: str,
    video: str | None,
    worker: str | None,
    index: int | None = None,
    occurrence: Callable[[Fault], int] | None = None,
) -> list[Fault]:
    """The faults that apply now; ``occurrence(fault)`` counts (and returns) this job's occurrences."""
    chosen = []
    for fault in faults:
        if not fault.matches(target=target, video=video, worker=worker, index=index):
            continue
        if fault.times is not None and occurrence is not None and occurrence(fault) > fault.times:
            continue
        chosen.append(fault)
    return chosen
