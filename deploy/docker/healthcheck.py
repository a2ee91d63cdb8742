"""Container health probe shared by every FaceFarm role in both images.

One image runs several roles, so the probe reads the role from PID 1's command line: the API and
Flower answer their own health endpoints; workers and the reconciler have no port, so their probe is
the one dependency they cannot work without, a broker ``PING`` with the configured credentials.
Exit status 0 means healthy (Docker's ``HEALTHCHECK`` and Kubernetes' ``exec`` probes read it).
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

from shared.settings import Settings, get_settings

PROBE_TIMEOUT_S = 5.0


def role_of(argv: list[str]) -> str:
    """The ``facefarm`` subcommand in ``argv`` (``worker``, ``api``...), or ``""`` for anything else."""
    for index, arg in enumerate(argv):
        if Path(arg).name == "facefarm" and index + 1 < len(argv):
            return argv[index + 1]
    return ""


def health_url(role: str, settings: Settings) -> str | None:
    """The local URL that proves ``role`` is serving, or None for roles without a port."""
    if role == "api":
        return f"http://127.0.0.1:{settings.api_port}/healthz"
    if role == "flower":
        return f"http://127.0.0.1:{settings.flower_port}/healthcheck"
    return None


def probe_http(url: str, timeout_s: float) -> bool:
    """True when ``url`` answers 2xx within ``timeout_s``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


def probe_broker(redis_url: str, timeout_s: float) -> bool:
    """True when the broker answers ``PING`` (credentials included) within ``timeout_s``."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def pid1_argv() -> list[str]:
    """The command line of the container's main process."""
    raw = Path("/proc/1/cmdline").read_bytes()
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def main() -> int:
    settings = get_settings()
    url = health_url(role_of(pid1_argv()), settings)
    healthy = probe_http(url, PROBE_TIMEOUT_S) if url else probe_broker(settings.redis_url, PROBE_TIMEOUT_S)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
