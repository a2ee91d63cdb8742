"""The test-only fault injection grammar (shared.faults): parsed strictly, matched precisely."""

from __future__ import annotations

import pytest

from shared.errors import ConfigError
from shared.faults import Fault, parse_faults, select
from shared.settings import Settings


def test_spec_parses_into_faults() -> None:
    faults = parse_faults(
        "raise:chunk,index=1,video=poison*.mp4; exit:merge,times=1;sleep:chunk,s=0.5,worker=r2"
    )
    assert faults == (
        Fault("raise", "chunk", index=1, video="poison*.mp4"),
        Fault("exit", "merge", times=1),
        Fault("sleep", "chunk", worker="r2", sleep_s=0.5),
    )
    assert parse_faults("") == () and parse_faults(None) == ()


@pytest.mark.parametrize(
    "bad",
    [
        "boom:chunk",
        "raise:disk",
        "raise",
        "raise:chunk,index",
        "raise:chunk,colour=red",
        "raise:chunk,index=x",
    ],
)
def test_malformed_specs_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="FACEFARM_FAULT_INJECTION"):
        parse_faults(bad)


def test_settings_refuse_a_typo_and_refuse_faults_in_production() -> None:
    assert Settings(fault_injection="raise:chunk,index=2").faults[0].index == 2
    with pytest.raises(ConfigError):
        Settings(fault_injection="raise:chunks")
    with pytest.raises(ConfigError, match="test hook"):
        Settings(
            fault_injection="raise:chunk", environment="production", api_tokens={"h": "o"},
            flower_basic_auth="a:b",
        )  # fmt: skip


def test_selection_matches_target_index_video_worker_and_times() -> None:
    faults = parse_faults("raise:chunk,index=1,video=p*.mp4,worker=render2,times=2")
    hit = {"target": "chunk", "video": "p1.mp4", "worker": "render2@host", "index": 1}
    counts = iter(range(1, 10))
    assert select(faults, **hit, occurrence=lambda f: next(counts))  # 1st
    assert select(faults, **hit, occurrence=lambda f: next(counts))  # 2nd
    assert not select(faults, **hit, occurrence=lambda f: next(counts))  # 3rd: times=2 used up
    for miss in ({"index": 0}, {"video": "q.mp4"}, {"worker": "render1@host"}, {"target": "merge"}):
        assert not select(faults, **{**hit, **miss})
