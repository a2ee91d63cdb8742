"""Read ``docker-compose.yml`` the way Compose does (interpolation, YAML merge keys) and turn a service
into the argv and environment it would run with on one host without Docker.

Only what the local run needs differs from the file, and every difference is explicit: the
``facefarm`` executable, the service host names (``redis:6379``, ``minio:9000``) and the overrides the
caller passes (ports, paths).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[3]
COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
# $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?])([^}]*))?\}")
# host names that exist only on the Compose network
COMPOSE_HOSTS = ("redis", "minio")


class ComposeError(ValueError):
    """The compose file needs a variable we did not give, or a service lacks what the test runs."""


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's variable substitution for one string."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, colon, op, arg = match.groups()
        value = variables.get(name)
        missing = value is None or (colon == ":" and value == "")
        if op == "-":
            return arg if missing else str(value)
        if op == "?" and missing:
            raise ComposeError(f"compose variable {name} is required: {arg}")
        return "" if value is None else str(value)

    return _VARIABLE.sub(substitute, text)


def _interpolate_tree(node: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, variables) for key, value in node.items()}
    return node


@dataclass(frozen=True)
class ComposeService:
    """One service's ``command:`` and ``environment:`` after interpolation."""

    name: str
    command: list[str]
    environment: dict[str, str]


def load_services(variables: Mapping[str, str], path: Path = COMPOSE_FILE) -> dict[str, ComposeService]:
    """Every service of the compose file that has a command (list form) and an environment."""
    tree = _interpolate_tree(yaml.safe_load(path.read_text()), variables)
    services = {}
    for name, spec in tree["services"].items():
        command = spec.get("command")
        environment = spec.get("environment") or {}
        if not isinstance(command, list) or not isinstance(environment, dict):
            continue
        env = {str(k): "" if v is None else str(v) for k, v in environment.items()}
        services[name] = ComposeService(name, [str(part) for part in command], env)
    return services


def local_command(command: list[str], facefarm: str, replace: Mapping[str, str] | None = None) -> list[str]:
    """The service's argv with ``facefarm`` resolved to an executable and flag values swapped."""
    if not command or command[0] != "facefarm":
        raise ComposeError(f"expected a `facefarm ...` command, got {command}")
    argv = [facefarm, *command[1:]]
    for flag, value in (replace or {}).items():
        if flag not in argv:
            raise ComposeError(f"{flag} is not in {command}")
        argv[argv.index(flag) + 1] = value
    return argv


def local_environment(
    environment: Mapping[str, str], hosts: Mapping[str, str], overrides: Mapping[str, str]
) -> dict[str, str]:
    """The service's environment with Compose host:port pairs mapped to real ones, then ``overrides``."""
    env = {}
    for key, value in environment.items():
        for compose_addr, real_addr in hosts.items():
            value = value.replace(compose_addr, real_addr)
        env[key] = value
    env.update(overrides)
    for key, value in env.items():
        for host in COMPOSE_HOSTS:
            if f"@{host}:" in value or f"//{host}:" in value:
                raise ComposeError(f"{key}={value!r} still names the compose host {host!r}")
    return env
