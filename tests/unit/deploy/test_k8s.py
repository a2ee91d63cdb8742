"""deploy/k8s: renders with kustomize, every manifest is valid for a pinned Kubernetes, and the
farm-specific parts (MPS, KEDA, Flower, reconciler) say what the design needs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.unit.deploy.files import (
    FARM_NAMESPACE,
    K8S_DIR,
    KUBERNETES_VERSION,
    containers,
    find,
    load_schema,
    render_kustomization,
)

KEDA_SCHEMAS = {
    "ScaledObject": "keda-scaledobject-v1alpha1.json",
    "TriggerAuthentication": "keda-triggerauthentication-v1alpha1.json",
}


def strict(schema: Any) -> Any:
    """A CRD's schema that also rejects unknown fields, like ``kubectl apply --validate=strict``."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def validate_crd(doc: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(strict(load_schema(KEDA_SCHEMAS[doc["kind"]]))).validate(doc)


def test_every_builtin_manifest_is_valid_for_the_pinned_kubernetes(k8s_docs: list[dict[str, Any]]) -> None:
    builtin = [d for d in k8s_docs if d["kind"] not in KEDA_SCHEMAS]
    assert {d["kind"] for d in builtin} >= {
        "Namespace",
        "ConfigMap",
        "Secret",
        "StatefulSet",
        "Service",
        "Deployment",
        "PersistentVolumeClaim",
    }
    for doc in builtin:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validation_rejects_an_unknown_field(k8s_docs: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(find(k8s_docs, "Deployment", "api"))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_keda_resources_match_the_keda_crd_schemas(k8s_docs: list[dict[str, Any]]) -> None:
    keda = [d for d in k8s_docs if d["kind"] in KEDA_SCHEMAS]
    assert sorted(d["kind"] for d in keda) == ["ScaledObject", "TriggerAuthentication"]
    for doc in keda:
        validate_crd(doc)
    broken = copy.deepcopy(find(k8s_docs, "ScaledObject", "gpu-worker"))
    broken["spec"]["minReplicas"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(broken)


def test_kustomize_fails_without_the_secrets_file(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="secrets.env"):
        render_kustomization(K8S_DIR, tmp_path, with_secrets=False)


def test_farm_resources_live_in_the_farm_namespace(k8s_docs: list[dict[str, Any]]) -> None:
    for doc in k8s_docs:
        if doc["kind"] == "Namespace":
            continue
        expected = (
            "nvidia-device-plugin"
            if doc["metadata"]["name"] == "nvidia-device-plugin-configs"
            else (FARM_NAMESPACE)
        )
        assert doc["metadata"]["namespace"] == expected, doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "facefarm"


def test_device_plugin_config_shares_each_gpu_four_ways_through_mps(k8s_docs: list[dict[str, Any]]) -> None:
    config_map = find(k8s_docs, "ConfigMap", "nvidia-device-plugin-configs")
    schema = load_schema("nvidia-device-plugin-config-v1.json")
    config = yaml.safe_load(config_map["data"]["mps"])
    jsonschema.Draft7Validator(schema).validate(config)
    assert config["sharing"]["mps"]["resources"] == [{"name": "nvidia.com/gpu", "replicas": 4}]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(
            {"version": "v1", "sharing": {"mps": {"resources": [{"name": "nvidia.com/gpu", "replicas": 1}]}}}
        )


def test_gpu_worker_is_one_mps_client_per_pod(k8s_docs: list[dict[str, Any]]) -> None:
    (container,) = containers(find(k8s_docs, "Deployment", "gpu-worker"))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    command = container["command"]
    assert command[:2] == ["facefarm", "worker"]
    assert command[command.index("--mps") + 1] == "external"
    assert command[command.index("--queues") + 1] == "gpu"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FACEFARM_MPS_PIPE_DIR"] == "/mps/nvidia.com/gpu/pipe"


def test_redis_statefulset_keeps_an_aof_and_never_evicts(k8s_docs: list[dict[str, Any]]) -> None:
    redis = find(k8s_docs, "StatefulSet", "redis")
    (container,) = containers(redis)
    command = " ".join(container["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert '--requirepass "$REDIS_PASSWORD"' in command
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_reconciler_is_a_single_replica_that_never_overlaps(k8s_docs: list[dict[str, Any]]) -> None:
    reconciler = find(k8s_docs, "Deployment", "reconciler")
    assert reconciler["spec"]["replicas"] == 1
    assert reconciler["spec"]["strategy"]["type"] == "Recreate"


def test_flower_is_internal_and_authenticated(k8s_docs: list[dict[str, Any]]) -> None:
    service = find(k8s_docs, "Service", "flower")
    assert service["spec"]["type"] == "ClusterIP"
    assert not any(d["kind"] == "Ingress" for d in k8s_docs)
    secret = find(k8s_docs, "Secret", "facefarm-secrets")
    assert "FACEFARM_FLOWER_BASIC_AUTH" in secret["data"]
    (container,) = containers(find(k8s_docs, "Deployment", "flower"))
    assert {"secretRef": {"name": "facefarm-secrets"}} in container["envFrom"]


def test_every_farm_pod_gets_settings_and_secrets_and_runs_unprivileged(
    k8s_docs: list[dict[str, Any]],
) -> None:
    workloads = [d for d in k8s_docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in workloads} == {
        "api",
        "cpu-worker",
        "reconciler",
        "gpu-worker",
        "flower",
    }
    for doc in workloads:
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert {"configMapRef": {"name": "facefarm-config"}} in container["envFrom"]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["FACEFARM_REDIS_URL"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
