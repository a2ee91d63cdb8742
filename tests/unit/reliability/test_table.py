"""tests/RELIABILITY.md must be what scripts/make_reliability_table.py renders from the committed
outcomes, and the outcomes must cover the current bad-input corpus."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[3]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_reliability_table", ROOT / "scripts" / "make_reliability_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_table_matches_the_committed_outcomes() -> None:
    script = _script()
    outcomes = json.loads(script.OUTCOMES.read_text())
    assert script.TABLE.read_text() == script.render_markdown(outcomes), (
        "tests/RELIABILITY.md is stale: run `python scripts/make_reliability_table.py`"
    )
    assert script.main(["--check"]) == 0


def test_outcomes_cover_every_case_of_the_bad_input_corpus() -> None:
    from tests.integration.reliability.corpus import corpus

    script = _script()
    recorded = {r["case"] for r in json.loads(script.OUTCOMES.read_text()) if r["category"] == "bad_input"}
    expected = {case.name for case in corpus()}
    assert len(expected) >= 40
    assert recorded == expected, (
        f"re-run the reliability tests and the script: missing {expected - recorded}, extra {recorded - expected}"
    )


def test_rendering_is_deterministic_and_normalize_keeps_the_last_record() -> None:
    script = _script()
    records = [
        {"category": "kill", "case": "k", "outcome": "old", "test": "t"},
        {"category": "kill", "case": "k", "outcome": "new", "seconds": 1.5, "test": "t"},
        {"category": "security", "case": "s", "outcome": "clean"},
    ]
    outcomes = script.normalize(records)
    assert outcomes == [
        {"category": "kill", "case": "k", "outcome": "new", "seconds": 1.5, "test": "t"},
        {"category": "security", "case": "s", "outcome": "clean"},
    ]
    assert script.render_markdown(outcomes) == script.render_markdown(list(outcomes))
    assert "| k | new | 1.5 |" in script.render_markdown(outcomes)
