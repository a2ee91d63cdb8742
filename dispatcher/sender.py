"""Send a Celery task by name without importing Celery: a protocol-2 message published with kombu.

The API process only ever enqueues three named tasks; pulling in a Celery app for that would break
the "only the Celery shells import celery" contract. The message is what ``celery.app.amqp.as_task_v2``
writes (headers + ``(args, kwargs, embed)`` body, JSON), published to the queue's direct exchange the
way Celery's own routing declares it, so workers cannot tell the difference.
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from kombu import Connection, Exchange, Queue

from shared.errors import BrokerUnavailableError
from shared.settings import Settings

PUBLISH_RETRIES = 3


def task_message_headers(
    name: str, task_id: str, args: list[Any], *, argsrepr: str | None, eta: str | None
) -> dict[str, Any]:
    """Celery message protocol 2 headers for a top-level task (no group, chord or parent)."""
    return {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": eta,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": argsrepr if argsrepr is not None else repr(args),
        "kwargsrepr": "{}",
        "origin": f"{os.getpid()}@{socket.gethostname()}",
        "ignore_result": False,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }


class KombuTaskSender:
    """``send_task(name, args, queue=..., task_id=..., argsrepr=..., countdown_s=...)`` over one connection."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.redis_url
        self._transport_options = {"visibility_timeout": settings.visibility_timeout_s}
        self._lock = threading.Lock()
        self._connection: Connection | None = None

    def __call__(
        self,
        name: str,
        args: list[Any],
        *,
        queue: str,
        task_id: str,
        argsrepr: str | None = None,
        countdown_s: float | None = None,
    ) -> None:
        eta = None
        if countdown_s:
            eta = (datetime.now(UTC) + timedelta(seconds=countdown_s)).isoformat()
        exchange = Exchange(queue, type="direct")
        declare = [Queue(queue, exchange, routing_key=queue)]
        headers = task_message_headers(name, task_id, list(args), argsrepr=argsrepr, eta=eta)
        body: tuple[list[Any], dict[str, Any], dict[str, Any]] = (
            list(args),
            {},
            {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
        )
        try:
            with self._lock:
                producer = self._get_connection().Producer(serializer="json")
                producer.publish(
                    body,
                    exchange=exchange,
                    routing_key=queue,
                    declare=declare,
                    headers=headers,
                    correlation_id=task_id,
                    reply_to="",
                    delivery_mode=2,
                    retry=True,
                    retry_policy={
                        "max_retries": PUBLISH_RETRIES,
                        "interval_start": 0.2,
                        "interval_step": 0.5,
                    },
                )
        except (OSError, ConnectionError) as exc:
            raise BrokerUnavailableError(f"could not enqueue {name} on queue {queue!r}: {exc}") from exc
        except Exception as exc:  # kombu/redis raise their own connection errors
            if type(exc).__module__.split(".")[0] in ("kombu", "redis", "amqp"):
                raise BrokerUnavailableError(f"could not enqueue {name} on queue {queue!r}: {exc}") from exc
            raise

    def _get_connection(self) -> Connection:
        if self._connection is None:
            self._connection = Connection(self._url, transport_options=self._transport_options)
        return self._connection

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.release()
                self._connection = None
