"""The Celery profile: the settings that keep long chunks from being redelivered or lost."""

from __future__ import annotations

import json

from shared.celery_config import celery_config
from shared.names import CPU_QUEUE, GPU_QUEUE, MERGE_JOB, PLAN_JOB, RENDER_CHUNK
from shared.settings import Settings


def test_visibility_timeout_is_set_in_all_three_places_above_the_hard_limit() -> None:
    settings = Settings(task_time_limit_s=1000, task_soft_time_limit_s=900, visibility_timeout_s=5000)
    for role in ("cpu", "gpu"):
        conf = celery_config(settings, role=role)
        assert conf["visibility_timeout"] == 5000
        assert conf["broker_transport_options"]["visibility_timeout"] == 5000
        assert conf["result_backend_transport_options"]["visibility_timeout"] == 5000
        assert conf["task_time_limit"] == 1000 < conf["visibility_timeout"]
        assert conf["task_soft_time_limit"] == 900


def test_reliability_and_serialisation_settings() -> None:
    conf = celery_config(Settings(), role="gpu")
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1 and conf["worker_concurrency"] == 1
    assert conf["worker_pool"] == "prefork"
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["worker_send_task_events"] and conf["task_send_sent_event"]
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"]
    assert conf["broker_connection_retry_on_startup"]
    assert conf["result_expires"] > 0
    json.dumps(conf)  # a plain, serialisable dict


def test_routes_send_render_to_gpu_and_plan_merge_to_cpu() -> None:
    routes = celery_config(Settings(), role="cpu")["task_routes"]
    assert routes[RENDER_CHUNK]["queue"] == GPU_QUEUE
    assert routes[PLAN_JOB]["queue"] == routes[MERGE_JOB]["queue"] == CPU_QUEUE
