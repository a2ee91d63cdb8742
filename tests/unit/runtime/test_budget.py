"""The budget and the planners: sizes, budget resolution, batch plans that always fit (tile plans:
``test_tile_plan.py``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import ConfigError, FrameTooLargeError
from shared.settings import Settings
from worker.runtime.budget import (
    BytesPerPixelCache,
    MemoryBudget,
    calibrate_bytes_per_pixel,
    plan_batch,
    plan_batches,
    resolve_budget,
)
from worker.runtime.sizes import GIB, MIB, parse_bytes, parse_mps_limit

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # only used as a label: nothing here touches CUDA


def test_sizes_parse_in_the_units_people_write() -> None:
    assert parse_bytes("2GiB") == 2 * GIB
    assert parse_bytes("2147483648") == 2 * GIB
    assert parse_bytes("512MiB") == 512 * MIB
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("4G") == 4 * GIB
    with pytest.raises(ConfigError, match="not a size"):
        parse_bytes("lots")


def test_mps_limit_is_read_per_device_ordinal() -> None:
    assert parse_mps_limit("0=4G") == 4 * GIB
    assert parse_mps_limit("0=1G,1=512MB", ordinal=1) == 512 * MIB
    assert parse_mps_limit("2G") == 2 * GIB  # no ordinal: every device
    assert parse_mps_limit("1=2G") is None
    with pytest.raises(ConfigError, match="CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"):
        parse_mps_limit("0=four")


def test_auto_budget_takes_the_mps_limit_passed_in() -> None:
    settings = Settings(gpu_budget="auto")
    assert resolve_budget(settings, CPU, mps_limit="0=4G", free_bytes=100 * GIB) == 4 * GIB
    # on a GPU the limit is also capped by what is really free (the context takes some)
    assert resolve_budget(settings, CUDA, mps_limit="0=4G", free_bytes=4 * GIB) == int(0.9 * 4 * GIB)
    assert resolve_budget(Settings(mps_mem_limit="0=3G"), CUDA, free_bytes=80 * GIB) == 3 * GIB


def test_auto_budget_without_mps_is_a_fraction_of_free_memory() -> None:
    settings = Settings(gpu_budget="auto", budget_free_fraction=0.5)
    assert resolve_budget(settings, CUDA, free_bytes=10 * GIB) == 5 * GIB


def test_explicit_budget_is_used_but_never_above_the_mps_limit() -> None:
    assert resolve_budget(Settings(gpu_budget="2GiB"), CUDA, free_bytes=80 * GIB) == 2 * GIB
    assert resolve_budget(Settings(gpu_budget="8GiB"), CUDA, mps_limit="0=4G", free_bytes=80 * GIB) == 4 * GIB


def test_budget_accounts_owners_and_refuses_overdraft() -> None:
    budget = MemoryBudget(100)
    budget.reserve("a", 60)
    assert budget.free_bytes == 40
    with pytest.raises(ValueError, match="only 40"):
        budget.reserve("b", 41)
    assert budget.release("a") == 60
    assert budget.free_bytes == 100
    with pytest.raises(ConfigError):
        MemoryBudget(0)


@given(
    bytes_per_item=st.integers(1, 10**9),
    free_bytes=st.integers(0, 10**11),
    max_batch=st.integers(1, 256),
)
def test_batch_plan_never_exceeds_the_free_bytes(
    bytes_per_item: int, free_bytes: int, max_batch: int
) -> None:
    batch = plan_batch(bytes_per_item, free_bytes, max_batch)
    assert 0 <= batch <= max_batch
    assert batch * bytes_per_item <= free_bytes
    assert batch == max_batch or (batch + 1) * bytes_per_item > free_bytes


def test_batch_fallbacks_halve_down_to_one_and_refuse_when_one_does_not_fit() -> None:
    assert [p.batch for p in plan_batches(10, 75, 16)] == [7, 3, 1]
    with pytest.raises(FrameTooLargeError, match="raise FACEFARM_GPU_BUDGET"):
        plan_batches(100, 99, 4)


def test_calibration_on_cpu_uses_the_declared_value_once_per_model() -> None:
    calls: list[int] = []

    def run(px: int) -> None:
        calls.append(px)

    assert calibrate_bytes_per_pixel(run, 64, device=CPU, declared=8200) == 8200.0
    with pytest.raises(ValueError, match="declared"):
        calibrate_bytes_per_pixel(run, 64, device=CPU)
    cache = BytesPerPixelCache()
    assert cache.get(("x4", "fp16"), run, 64, device=CPU, declared=1000) == 1000.0
    assert cache.get(("x4", "fp16"), run, 64, device=CPU, declared=5) == 1000.0
    assert cache.known() == {("x4", "fp16"): 1000.0}


def test_stages_run_bigger_batches_only_when_their_weights_must_page() -> None:
    from worker.runtime.budget import PAGING_BATCH_FRAMES, stage_batch_frames

    assert stage_batch_frames(8, weights_bytes=100, budget_bytes=1000) == 8  # all resident: as configured
    assert stage_batch_frames(8, weights_bytes=2000, budget_bytes=1000) == PAGING_BATCH_FRAMES == 16
    assert stage_batch_frames(32, weights_bytes=2000, budget_bytes=1000) == 32  # never smaller
