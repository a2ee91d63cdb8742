"""The safety net: an OOM steps down the plans; only the smallest plan failing fails the frame."""

from __future__ import annotations

import pytest
import torch

from shared.errors import FrameTooLargeError, GpuOutOfMemoryError
from worker.runtime.budget import TilePlan
from worker.runtime.oom import OomCounter, OomInjector, SimulatedOomError, run_with_oom_retry


def tile_plan(core_px: int, batch: int, nbytes: int) -> TilePlan:
    window = core_px + 32
    return TilePlan(core_px, core_px, 16, batch, 4, window, window, nbytes)


PLANS = [tile_plan(256, 2, 900), tile_plan(256, 1, 450), tile_plan(128, 1, 120)]


def test_the_injector_raises_a_cuda_oom_on_the_chosen_calls() -> None:
    injector = OomInjector(fail_on_calls=[2, 3])
    fn = injector.wrap(lambda x: x + 1)
    assert fn(1) == 2
    for _ in range(2):
        with pytest.raises(torch.cuda.OutOfMemoryError):
            fn(1)
    assert fn(1) == 2
    assert (injector.calls, injector.raised) == (4, 2)
    assert issubclass(SimulatedOomError, torch.OutOfMemoryError)


def test_an_oom_retries_with_the_next_smaller_plan_and_is_counted() -> None:
    injector = OomInjector(fail_on_calls=1)
    tried: list[TilePlan] = []
    retries: list[tuple[int, int, str]] = []
    counter = OomCounter()

    def step(plan: TilePlan) -> str:
        tried.append(plan)
        injector.check()
        return f"ran at {plan.core_h}/{plan.batch}"

    result = run_with_oom_retry(
        step, PLANS, counter=counter, on_retry=lambda a, b, msg: retries.append((a.batch, b.batch, msg))
    )
    assert result == "ran at 256/1"
    assert tried == PLANS[:2]
    assert retries == [(2, 1, "CUDA out of memory (simulated on call 1)")]
    assert (counter.recoveries, counter.failures) == (1, 0)


def test_our_translated_oom_is_caught_too() -> None:
    calls = []

    def step(plan: TilePlan) -> int:
        calls.append(plan)
        if len(calls) == 1:
            raise GpuOutOfMemoryError("model 'x' needs 1 GiB")
        return plan.core_h

    assert run_with_oom_retry(step, PLANS) == 256


def test_the_smallest_plan_gets_one_more_try_after_freeing_the_cache() -> None:
    injector = OomInjector(fail_on_calls=1)
    only = [tile_plan(32, 1, 10)]
    assert run_with_oom_retry(lambda plan: injector.check() or plan.core_h, only) == 32
    assert injector.calls == 2


def test_when_the_smallest_plan_fails_the_frame_is_too_large_and_the_message_has_the_numbers() -> None:
    injector = OomInjector(fail_on_calls=range(1, 10))
    counter = OomCounter()
    with pytest.raises(FrameTooLargeError) as info:
        run_with_oom_retry(lambda plan: injector.check(), PLANS, counter=counter, budget_bytes=2 * 1024**3)
    message = str(info.value)
    assert "cores 128x128 px" in message and "2.00 GiB" in message and "FACEFARM_GPU_BUDGET" in message
    assert injector.calls == len(PLANS) + 1
    assert (counter.recoveries, counter.failures) == (3, 1)
    assert isinstance(info.value.__cause__, GpuOutOfMemoryError)


def test_other_errors_are_not_swallowed() -> None:
    calls = []

    def step(plan: TilePlan) -> None:
        calls.append(plan)
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        run_with_oom_retry(step, PLANS)
    assert len(calls) == 1
