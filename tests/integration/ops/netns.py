"""Hosts for the multi-host test: Linux network namespaces joined by veth pairs the test creates.

Topology (one /24 per link, all inside 10.203.0.0/16, used only by the namespaces made here)::

    root ns  10.203.0.2 ──veth── 10.203.0.1  head ns (redis, moto S3, API, cpu worker)
                                 10.203.N.1 ──veth── 10.203.N.2  worker host N (render worker)

Each host also gets its own UTS namespace (its own hostname, so Celery node names differ as they
would on real machines); worker hosts get a private mount namespace with a tmpfs on ``/tmp``, their
own ``HOME`` and their own copy of the model store in it, so nothing is shared with the head but the
network. Everything is removed in ``finally``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUBNET_PREFIX = "10.203."
PROJECT_ROOT = Path(__file__).resolve().parents[3]
_KEEP = "/run/ff-project-root"
# run inside a worker host: own hostname, private /tmp with HOME, a scratch dir and the model store;
# the checkout (and its .venv) stays visible even when it lives under /tmp (a CI clone may).
WORKER_HOST_SCRIPT = (
    f'hostname "$0" && mkdir -p {_KEEP} && mount --bind {shlex.quote(str(PROJECT_ROOT))} {_KEEP}'
    " && mount -t tmpfs -o size=1g ff-host-tmp /tmp"
    f" && mkdir -p {shlex.quote(str(PROJECT_ROOT))} && mount --bind {_KEEP} {shlex.quote(str(PROJECT_ROOT))}"
    ' && mkdir -p /tmp/home /tmp/scratch && cp -r "$FF_MODEL_STORE_SOURCE" /tmp/models && exec "$@"'
)
HEAD_HOST_SCRIPT = 'hostname "$0" && exec "$@"'


class NamespaceError(AssertionError):
    """The sandbox cannot create what the test needs (no CAP_SYS_ADMIN, no iproute2, ...)."""


def ip(*args: str) -> list[str]:
    return ["ip", *args]


def _run(command: Sequence[str]) -> None:
    done = subprocess.run(list(command), capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NamespaceError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")


def probe() -> None:
    """Fail (never skip) with a clear message when network namespaces are not available here."""
    name = f"ffprobe{os.getpid()}"
    try:
        _run(ip("netns", "add", name))
    except FileNotFoundError as exc:
        raise NamespaceError("iproute2 is missing: `apt-get install -y iproute2`") from exc
    except NamespaceError as exc:
        raise NamespaceError(
            f"this sandbox refuses network namespaces ({exc}); the multi-host test needs root with "
            "CAP_SYS_ADMIN and CAP_NET_ADMIN"
        ) from exc
    _run(ip("netns", "del", name))


def check_subnet_unused() -> None:
    """Refuse to run where 10.203.0.0/16 is already routed: the test must only use its own addresses."""
    routes = subprocess.run(ip("-4", "route", "show"), capture_output=True, text=True, check=True).stdout
    addrs = subprocess.run(ip("-4", "-o", "addr", "show"), capture_output=True, text=True, check=True).stdout
    if SUBNET_PREFIX in routes or SUBNET_PREFIX in addrs:
        raise NamespaceError(f"{SUBNET_PREFIX}0.0/16 is already in use on this machine; not touching it")


@dataclass(frozen=True)
class Host:
    """One namespace: its name, its hostname, and the head's address as seen from it."""

    netns: str
    hostname: str
    head_addr: str  # where this host reaches the head
    own_addr: str

    def prefix(self, script: str) -> list[str]:
        """Run a command on this host: ``PREFIX + argv`` (argv is exec'd, so signals reach it)."""
        unshare = ["unshare", "--uts"]
        if script == WORKER_HOST_SCRIPT:
            unshare += ["--mount", "--propagation", "private"]
        return ["ip", "netns", "exec", self.netns, *unshare, "sh", "-c", script, self.hostname]


@dataclass(frozen=True)
class Topology:
    head: Host  # head_addr: the head's address from the root namespace (where the test runs)
    workers: tuple[Host, ...]


def _link_commands(tag: str, workers: int) -> list[list[str]]:
    head = f"ff{tag}-head"
    commands = [ip("netns", "add", head), ip("-n", head, "link", "set", "lo", "up")]
    root_if, head_if = f"ff{tag}r0", f"ff{tag}h0"
    commands += [
        ip("link", "add", root_if, "type", "veth", "peer", "name", head_if, "netns", head),
        ip("addr", "add", f"{SUBNET_PREFIX}0.2/24", "dev", root_if),
        ip("link", "set", root_if, "up"),
        ip("-n", head, "addr", "add", f"{SUBNET_PREFIX}0.1/24", "dev", head_if),
        ip("-n", head, "link", "set", head_if, "up"),
    ]
    for n in range(1, workers + 1):
        ns, h_if, w_if = f"ff{tag}-w{n}", f"ff{tag}h{n}", f"ff{tag}w{n}"
        commands += [
            ip("netns", "add", ns),
            ip("-n", ns, "link", "set", "lo", "up"),
            ip("-n", head, "link", "add", h_if, "type", "veth", "peer", "name", w_if, "netns", ns),
            ip("-n", head, "addr", "add", f"{SUBNET_PREFIX}{n}.1/24", "dev", h_if),
            ip("-n", head, "link", "set", h_if, "up"),
            ip("-n", ns, "addr", "add", f"{SUBNET_PREFIX}{n}.2/24", "dev", w_if),
            ip("-n", ns, "link", "set", w_if, "up"),
        ]
    return commands


@contextmanager
def topology(workers: int) -> Iterator[Topology]:
    """Create the head and ``workers`` worker hosts; delete every namespace and link on exit."""
    probe()
    check_subnet_unused()
    tag = f"{os.getpid() % 100000:05d}"
    head = Host(f"ff{tag}-head", "ff-head", f"{SUBNET_PREFIX}0.1", f"{SUBNET_PREFIX}0.1")
    hosts = tuple(
        Host(f"ff{tag}-w{n}", f"ff-host{n}", f"{SUBNET_PREFIX}{n}.1", f"{SUBNET_PREFIX}{n}.2")
        for n in range(1, workers + 1)
    )
    try:
        for command in _link_commands(tag, workers):
            _run(command)
        yield Topology(head, hosts)
    finally:
        for host in (*hosts, head):  # deleting a namespace removes its end of each veth pair, and the pair
            subprocess.run(ip("netns", "del", host.netns), capture_output=True, timeout=30)
        subprocess.run(ip("link", "del", f"ff{tag}r0"), capture_output=True, timeout=30)
