"""The safety net: a CUDA out-of-memory shrinks the plan instead of failing the chunk.

A step is run with the first plan; on OOM the cache is freed and the step is retried with the next
(smaller) plan. Only when the smallest plan still runs out of memory does the chunk fail, with a
permanent ``FrameTooLargeError`` naming the plan and the budget.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from shared.errors import FrameTooLargeError, GpuOutOfMemoryError
from worker.runtime.sizes import format_bytes

log = logging.getLogger(__name__)

P = TypeVar("P")
T = TypeVar("T")

OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError, GpuOutOfMemoryError)


class SimulatedOomError(torch.OutOfMemoryError):
    """Raised by ``OomInjector``; caught exactly like a real CUDA OOM."""


class OomInjector:
    """Raises a simulated OOM on chosen calls (1-based), so tests can drive the safety net on a CPU."""

    def __init__(self, fail_on_calls: int | Sequence[int] = 1) -> None:
        calls = [fail_on_calls] if isinstance(fail_on_calls, int) else list(fail_on_calls)
        self._fail_on = set(calls)
        self.calls = 0
        self.raised = 0

    def check(self) -> None:
        self.calls += 1
        if self.calls in self._fail_on:
            self.raised += 1
            raise SimulatedOomError(f"CUDA out of memory (simulated on call {self.calls})")

    def wrap(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` with a check before every call."""

        def wrapped(*args: Any, **kwargs: Any) -> T:
            self.check()
            return fn(*args, **kwargs)

        return wrapped


@dataclass
class OomCounter:
    """How often the safety net caught an OOM (recoveries) and gave up (failures)."""

    recoveries: int = 0
    failures: int = 0


def free_cached_memory() -> None:
    """Collect dead tensors and hand cached blocks back, so the retry starts from a clean allocator."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_with_oom_retry(
    step: Callable[[P], T],
    plans: Sequence[P],
    *,
    on_retry: Callable[[P, P, str], None] | None = None,
    counter: OomCounter | None = None,
    budget_bytes: int | None = None,
    errors: tuple[type[BaseException], ...] = OOM_ERRORS,
) -> T:
    """``step(plan)`` with the first plan that does not run out of memory.

    After an OOM the cache is freed and the next plan is tried; the smallest plan gets one more
    try after the flush (a fragmented cache alone can cause an OOM). ``on_retry(failed, next,
    message)`` is told about each recovery.
    """
    if not plans:
        raise ValueError("run_with_oom_retry needs at least one plan")
    attempts = [*plans, plans[-1]]
    last_message = ""
    for i, plan in enumerate(attempts):
        try:
            return step(plan)
        except errors as exc:
            last_message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            # drop the traceback: its frames hold the tensors we want freed
            exc.__traceback__ = None
            del exc
        free_cached_memory()
        if i + 1 < len(attempts):
            nxt = attempts[i + 1]
            if counter is not None:
                counter.recoveries += 1
            log.warning("out of GPU memory at %s; retrying at %s (%s)", plan, nxt, last_message)
            if on_retry is not None:
                on_retry(plan, nxt, last_message)
    if counter is not None:
        counter.failures += 1
    budget = f"the GPU budget of {format_bytes(budget_bytes)}" if budget_bytes else "the GPU budget"
    raise FrameTooLargeError(
        f"one frame at the smallest plan ({plans[-1]}) does not fit {budget}: raise FACEFARM_GPU_BUDGET, "
        "run fewer clients per GPU or lower --upscale",
        plan=str(plans[-1]),
        budget_bytes=budget_bytes,
    ) from GpuOutOfMemoryError(last_message)
