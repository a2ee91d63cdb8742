"""The render process's "auto" settings resolve by whether a blend pool runs (bench/RESULTS.md, fifth
session: with the pool, SR batch 8 and a 5 ms switch interval won on the H200; without it, 2 and 1 ms won,
on the H200 before the pool and on the CPU path)."""

from __future__ import annotations

import pytest

from shared.settings import Settings
from worker.session import RenderSession


def session(**overrides) -> RenderSession:
    return RenderSession(Settings(device="cpu", **overrides))


def test_the_cpu_blends_in_the_face_thread_with_small_sr_batches_and_a_short_switch_interval() -> None:
    s = session()
    assert s.blend_threads == 0
    assert s.sr_max_batch == 2
    assert s.gil_switch_interval_s == pytest.approx(0.001)
    assert not s.detect_ahead


def test_a_blend_pool_takes_larger_sr_batches_and_pythons_switch_interval() -> None:
    s = session(blend_threads=2)
    assert s.blend_threads == 2
    assert s.sr_max_batch == 8
    assert s.gil_switch_interval_s == pytest.approx(0.005)
    assert not s.detect_ahead  # detection stays in the face thread when blends run in a pool


@pytest.mark.parametrize(
    ("overrides", "batch", "interval_s", "ahead"),
    [
        ({"sr_max_batch": 3, "gil_switch_interval_ms": 0.25}, 3, 0.00025, False),
        ({"blend_threads": 2, "sr_max_batch": 1, "gil_switch_interval_ms": 2.0}, 1, 0.002, False),
        ({"detect_ahead": "on"}, 2, 0.001, True),
    ],
)
def test_explicit_values_win(overrides, batch, interval_s, ahead) -> None:
    s = session(**overrides)
    assert s.sr_max_batch == batch
    assert s.gil_switch_interval_s == pytest.approx(interval_s)
    assert s.detect_ahead is ahead


@pytest.mark.parametrize(
    ("name", "value"), [("sr_max_batch", "0"), ("gil_switch_interval_ms", "-1"), ("blend_threads", "x")]
)
def test_bad_values_name_the_setting(monkeypatch, name, value) -> None:
    monkeypatch.setenv(f"FACEFARM_{name.upper()}", value)
    with pytest.raises(ValueError, match=name):
        Settings()
