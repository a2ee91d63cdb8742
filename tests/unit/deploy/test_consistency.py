"""The deployment files agree with the code: CLI commands, settings names, the gpu queue, time limits.

Compose, Kubernetes and the Dockerfiles restate facts the Python side owns; each test here fails when
one side changes and the other does not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from facefarm.cli import build_parser
from shared.celery_config import SOFT_SHUTDOWN_TIMEOUT_S, celery_config, task_routes
from shared.names import GPU_QUEUE, RENDER_CHUNK
from shared.settings import Settings
from tests.unit.deploy.files import COMPOSE_FILE, DOCKERFILES, FARM_NAMESPACE, REPO, containers, find

ENV_NAME = re.compile(r"\bFACEFARM_[A-Z0-9_]+\b")


def deployment_files() -> list[Path]:
    """Every file this layer owns that may name settings or run ``facefarm``."""
    files = [COMPOSE_FILE, *sorted(p for p in (REPO / "deploy").rglob("*") if p.is_file())]
    return [p for p in files if "__pycache__" not in p.parts]


def facefarm_commands(compose: dict[str, Any], k8s_docs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Every argv that starts with ``facefarm``, keyed by where it comes from."""
    found: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command[:1] == ["facefarm"]:
            found[f"compose:{name}"] = [str(arg) for arg in command]
    for doc in k8s_docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for container in containers(doc):
                argv = [*container.get("command", []), *container.get("args", [])]
                if argv[:1] == ["facefarm"]:
                    found[f"k8s:{doc['metadata']['name']}/{container['name']}"] = argv
    for path in DOCKERFILES:
        for match in re.finditer(r"^CMD\s+(\[.*\])\s*$", path.read_text(), re.MULTILINE):
            argv = json.loads(match.group(1))
            if argv[:1] == ["facefarm"]:
                found[f"{path.name}:CMD"] = argv
    return found


def test_every_facefarm_command_parses_with_the_cli(
    compose_resolved: dict[str, Any], k8s_docs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    commands = facefarm_commands(compose_resolved, k8s_docs)
    subcommands = {argv[1] for argv in commands.values()}
    assert subcommands == {"api", "worker", "reconciler", "flower"}, subcommands
    assert {"compose:gpu-worker", "k8s:gpu-worker/gpu-worker", "Dockerfile.gpu:CMD"} <= commands.keys()
    parser = build_parser()
    for where, argv in commands.items():
        try:
            parsed = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: {' '.join(argv)!r} does not parse: {capsys.readouterr().err.strip()}")
        assert parsed.command == argv[1], where


def test_every_facefarm_env_name_is_a_setting() -> None:
    fields = {f"FACEFARM_{name.upper()}" for name in Settings.model_fields}
    used: dict[str, set[str]] = {}
    for path in deployment_files():
        for name in ENV_NAME.findall(path.read_text(errors="replace")):
            used.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert {"FACEFARM_REDIS_URL", "FACEFARM_PER_GPU", "FACEFARM_MPS_PIPE_DIR"} <= used.keys()
    unknown = {name: sorted(where) for name, where in used.items() if name not in fields}
    assert not unknown, f"not fields of shared.settings.Settings: {unknown}"


def test_keda_watches_the_redis_list_celery_fills_for_the_gpu_queue(k8s_docs: list[dict[str, Any]]) -> None:
    (trigger,) = find(k8s_docs, "ScaledObject", "gpu-worker")["spec"]["triggers"]
    assert trigger["type"] == "redis"
    # kombu's Redis transport keeps a queue in a list named after it, unless priorities split it.
    settings = Settings()
    config = celery_config(settings, role="gpu")
    assert task_routes()[RENDER_CHUNK]["queue"] == GPU_QUEUE
    assert "priority_steps" not in config["broker_transport_options"]
    assert "queue_order_strategy" not in config["broker_transport_options"]
    assert trigger["metadata"]["listName"] == GPU_QUEUE
    # ...in the database and on the server the workers use.
    (container,) = containers(find(k8s_docs, "Deployment", "gpu-worker"))
    redis_url = urlsplit({e["name"]: e.get("value") for e in container["env"]}["FACEFARM_REDIS_URL"])
    assert trigger["metadata"]["databaseIndex"] == redis_url.path.lstrip("/")
    find(k8s_docs, "Service", redis_url.hostname or "")
    assert trigger["metadata"]["address"] == f"{redis_url.hostname}.{FARM_NAMESPACE}.svc:{redis_url.port}"
    assert find(k8s_docs, "ScaledObject", "gpu-worker")["spec"]["scaleTargetRef"]["name"] == "gpu-worker"


def test_gpu_worker_grace_period_outlasts_the_hard_time_limit(k8s_docs: list[dict[str, Any]]) -> None:
    config = find(k8s_docs, "ConfigMap", "facefarm-config")["data"]
    limit_s = max(Settings().task_time_limit_s, int(config["FACEFARM_TASK_TIME_LIMIT_S"]))
    grace_s = find(k8s_docs, "Deployment", "gpu-worker")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    assert grace_s > limit_s + SOFT_SHUTDOWN_TIMEOUT_S, (grace_s, limit_s)
