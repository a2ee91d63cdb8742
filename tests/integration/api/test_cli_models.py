"""``facefarm models list|verify`` against the real session model store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facefarm.cli import main
from shared.model_store import ensure_store

pytestmark = pytest.mark.integration

STORE = Path(__file__).resolve().parents[3] / "models-store"


@pytest.fixture(scope="module")
def store() -> Path:
    return ensure_store(STORE)


def test_verify_passes_on_a_complete_store(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "verify", "--store", str(store)]) == 0
    assert "verified" in capsys.readouterr().out


def test_verify_of_an_empty_store_fails_with_one_line_naming_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "verify", "--store", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("facefarm: error: model store")
    assert f"facefarm models fetch --store {tmp_path}" in err[0]


def test_list_json_names_the_shipped_models(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--store", str(store), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert entries and all(e["present"] for e in entries if e["origin"] == "shipped")


def test_add_copies_a_user_file_with_its_licence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "mine.onnx"
    weights.write_bytes(b"\x08\x01weights")
    store = tmp_path / "store"
    argv = [
        "models",
        "add",
        "mine.onnx",
        str(weights),
        "--store",
        str(store),
        "--licence",
        "MIT",
        "--source",
        "me",
    ]
    assert main(argv) == 0
    assert "added mine.onnx" in capsys.readouterr().out
    assert main(["models", "list", "--store", str(store), "--json"]) == 0
    users = [e for e in json.loads(capsys.readouterr().out) if e["origin"] == "user"]
    assert [(e["name"], e["licence"], e["present"]) for e in users] == [("mine.onnx", "MIT", True)]
