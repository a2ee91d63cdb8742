"""docker-compose.yml: valid Compose, and the properties the farm relies on (no Docker engine here)."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml

from tests.unit.deploy.files import COMPOSE_FILE, HOST_MPS_OVERRIDE, interpolate, load_schema

FARM_SERVICES = ("api", "cpu-worker", "reconciler", "flower", "gpu-worker")


def _validate(document: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(load_schema("compose-spec.json")).validate(document)


@pytest.mark.parametrize("path", [COMPOSE_FILE, HOST_MPS_OVERRIDE], ids=lambda p: p.name)
def test_compose_files_validate_against_the_compose_specification(path: Any) -> None:
    _validate(yaml.safe_load(path.read_text()))


def test_schema_check_rejects_a_misspelled_service_key(compose: dict[str, Any]) -> None:
    broken = {**compose, "services": {**compose["services"], "api": {**compose["services"]["api"]}}}
    broken["services"]["api"]["depends_onn"] = ["redis"]
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)


SECRETS = ("REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "MINIO_ROOT_PASSWORD", "FACEFARM_API_TOKENS")


@pytest.mark.parametrize("missing", SECRETS)
def test_compose_refuses_to_start_without_each_secret(compose_text: str, missing: str) -> None:
    with pytest.raises(KeyError, match=missing):
        interpolate(compose_text, {name: "x" for name in SECRETS if name != missing})


def test_redis_is_durable_unevicting_and_password_protected(compose_resolved: dict[str, Any]) -> None:
    redis = compose_resolved["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert '--requirepass "$REDIS_PASSWORD"' in command
    assert redis["environment"]["REDIS_PASSWORD"] == "sample-redis_password"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_farm_services_start_only_after_healthy_dependencies(compose_resolved: dict[str, Any]) -> None:
    services = compose_resolved["services"]
    for name in FARM_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name
        assert services[name]["environment"]["FACEFARM_REDIS_URL"].startswith(
            "redis://:sample-redis_password@redis:6379/"
        ), name
    assert services["gpu-worker"]["depends_on"]["mps"]["condition"] == "service_healthy"
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert "healthcheck" in services[dependency] or dependency == "minio-init", (name, dependency)


def test_gpu_worker_reserves_gpus_and_shares_the_mps_pipe(compose_resolved: dict[str, Any]) -> None:
    services = compose_resolved["services"]
    worker, mps = services["gpu-worker"], services["mps"]
    for service in (worker, mps):
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
        assert service["ipc"] == "host"
    assert worker["command"][:2] == ["facefarm", "worker"]
    assert worker["command"][worker["command"].index("--mps") + 1] == "external"
    assert worker["command"][worker["command"].index("--per-gpu") + 1] == "1"
    assert mps["command"] == ["nvidia-cuda-mps-control", "-f"]
    pipe = worker["environment"]["FACEFARM_MPS_PIPE_DIR"]
    assert f"mps-pipe:{pipe}" in worker["volumes"] and f"mps-pipe:{pipe}" in mps["volumes"]
    assert mps["environment"]["CUDA_MPS_PIPE_DIRECTORY"] == pipe


def test_flower_has_auth_state_and_only_a_loopback_port(compose_resolved: dict[str, Any]) -> None:
    flower = compose_resolved["services"]["flower"]
    assert flower["command"] == ["facefarm", "flower"]
    assert flower["environment"]["FACEFARM_FLOWER_BASIC_AUTH"] == "sample-flower_basic_auth"
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])
    state_dir = flower["environment"]["FLOWER_DB"].rsplit("/", 1)[0]
    assert f"flower-state:{state_dir}" in flower["volumes"]


def test_published_ports_default_to_loopback(compose_resolved: dict[str, Any]) -> None:
    for name, service in compose_resolved["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_prometheus_is_an_opt_in_profile(compose_resolved: dict[str, Any]) -> None:
    services = compose_resolved["services"]
    assert services["prometheus"]["profiles"] == ["prometheus"]
    assert services["gpu-worker"]["profiles"] == ["gpu"] and services["mps"]["profiles"] == ["gpu"]
    assert any("deploy/prometheus/prometheus.yml" in v for v in services["prometheus"]["volumes"])
