"""The weights tier with fake models: budget accounting, LRU eviction, prefetch, no copy-back."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from shared.errors import ConfigError, GpuOutOfMemoryError
from worker.runtime.budget import MemoryBudget
from worker.runtime.model_cache import ModelCache

CPU = torch.device("cpu")
KIB = 1024

Loader = tuple[Callable[[str], nn.Module], list[str]]


class CheckedBudget(MemoryBudget):
    """A budget that records its high-water mark, to prove the cache never overdraws it."""

    def __init__(self, budget_bytes: int) -> None:
        super().__init__(budget_bytes)
        self.high_water = 0

    def reserve(self, owner: str, nbytes: int) -> None:
        super().reserve(owner, nbytes)
        self.high_water = max(self.high_water, self.reserved_bytes)


def test_weights_are_measured_from_the_loaded_model(fake_loader: Loader) -> None:
    load, _ = fake_loader
    cache = ModelCache(MemoryBudget(1024 * KIB), CPU, load)
    # m4: a 1023x1 fp32 weight, a bias and a 4-byte buffer; each rounds up to a 512-byte block
    assert cache.weights_bytes("m4") == 4 * KIB + 2 * 512


def test_lru_evicts_the_least_recently_used_idle_model(fake_loader: Loader) -> None:
    load, _ = fake_loader
    budget = CheckedBudget(16 * KIB)  # three 5 KiB models fit, a fourth (9 KiB) needs two out
    cache = ModelCache(budget, CPU, load)
    for name in ("m4-a", "m4-b", "m4-c"):
        with cache.acquire(name):
            pass
    with cache.acquire("m4-a"):  # a becomes most recent
        pass
    assert cache.resident_names() == ["m4-b", "m4-c", "m4-a"]
    with cache.acquire("m8-d"):  # needs 9 KiB: b and c (least recent) must go, a stays
        pass
    assert cache.resident_names() == ["m4-a", "m8-d"]
    assert cache.stats.evictions == 2
    assert budget.high_water <= budget.budget_bytes


def test_a_model_in_use_is_never_evicted(fake_loader: Loader) -> None:
    load, _ = fake_loader
    cache = ModelCache(MemoryBudget(10 * KIB), CPU, load)
    with cache.acquire("m4-a"):
        assert cache.prefetch("m8-b") is False  # would need a's room while a computes
        with pytest.raises(GpuOutOfMemoryError, match="m4-a"):
            with cache.acquire("m8-b"):
                pass
        assert cache.is_resident("m4-a")
    with cache.acquire("m8-b"):  # once a is idle it can go
        assert not cache.is_resident("m4-a")


def test_prefetch_pages_the_next_stage_in_while_the_current_one_runs(fake_loader: Loader) -> None:
    load, _ = fake_loader
    budget = CheckedBudget(12 * KIB)
    cache = ModelCache(budget, CPU, load)
    stages = ["m4-detect", "m4-swap", "m4-enhance", "m4-detect", "m4-swap"]
    for i, name in enumerate(stages):
        with cache.acquire(name):
            if i + 1 < len(stages):
                cache.prefetch(stages[i + 1])
                assert cache.is_resident(name) and cache.is_resident(stages[i + 1])
    # every stage but the first was already resident when acquired (prefetched or kept)
    assert cache.stats.prefetches + 1 == cache.stats.page_ins
    assert budget.high_water <= budget.budget_bytes


def test_host_copies_are_made_once_and_eviction_never_copies_back(fake_loader: Loader) -> None:
    load, calls = fake_loader
    cache = ModelCache(MemoryBudget(6 * KIB), CPU, load)
    with cache.acquire("m4-a") as module:
        weight = module.weight
        host_ptr = weight.data_ptr()
        weight.data.add_(1.0)  # a device-side change must not survive eviction... on CPU it is the host
    with cache.acquire("m4-b"):
        pass
    assert not cache.is_resident("m4-a")
    assert weight.data_ptr() == host_ptr  # the module points at its host copy again
    with cache.acquire("m4-a") as module:
        assert module.weight is weight
    assert calls == ["m4-a", "m4-b"]  # loaded once each, whatever the paging
    assert cache.stats.bytes_paged_in == 2 * cache.weights_bytes("m4-a") + cache.weights_bytes("m4-b")


def test_a_model_bigger_than_the_budget_is_a_configuration_error(fake_loader: Loader) -> None:
    load, _ = fake_loader
    cache = ModelCache(MemoryBudget(8 * KIB), CPU, load)
    with pytest.raises(ConfigError, match="more than the whole GPU budget"):
        with cache.acquire("m16-big"):
            pass


def test_evict_idle_makes_room_for_activations(fake_loader: Loader) -> None:
    load, _ = fake_loader
    budget = MemoryBudget(20 * KIB)
    cache = ModelCache(budget, CPU, load)
    for name in ("m4-a", "m4-b", "m4-c"):
        with cache.acquire(name):
            pass
    freed = cache.evict_idle(min_free_bytes=10 * KIB)
    assert freed == cache.weights_bytes("m4-a")
    assert cache.resident_names() == ["m4-b", "m4-c"]
    cache.close()
    assert cache.resident_names() == [] and budget.reserved_bytes == 0
