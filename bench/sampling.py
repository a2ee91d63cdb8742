"""Where each thread of a render spends its time, sampled from outside with py-spy.

cProfile and torch.profiler slow the render down and see Python calls only; py-spy reads the stacks
of every thread from another process, with no change to the program (``--nonblocking``: it never
stops it). Two samplers run at once: one over the threads that are running (not waiting on a lock,
the GIL included, or on I/O), one over the thread that holds the GIL (``--gil``), which says who
keeps the other stages waiting.

The GPU machine carries py-spy as a wheel (``bench/prepare_carry.sh``); without it the sampled case
runs unsampled and says so.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_THREAD = re.compile(r"^thread \((?:0x)?[0-9a-fA-F]+\): (?P<name>[^;]*)")
_CHUNK_SUFFIX = re.compile(r"[-_]\d+(_\d+)?$")  # "blend-1_0" -> "blend", "finish-3" -> "finish"


def py_spy_binary() -> str | None:
    """The py-spy executable: ``PY_SPY`` if set, else on PATH (a carried wheel installs it in bin/)."""
    return os.environ.get("PY_SPY") or shutil.which("py-spy")


@contextmanager
def sampled(out_dir: Path, *, rate_hz: int = 250) -> Iterator[dict[str, Path]]:
    """Sample this process's threads while the block runs; yields the raw files it will write
    (``active``, ``gil``), or an empty dict when py-spy is missing or cannot attach."""
    binary = py_spy_binary()
    if binary is None:
        yield {}
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"active": out_dir / "py-spy-active.txt", "gil": out_dir / "py-spy-gil.txt"}
    procs = []
    for kind, path in files.items():
        cmd = [binary, "record", "--pid", str(os.getpid()), "--threads", "--nonblocking", "--format", "raw",
               "--rate", str(rate_hz), "-o", str(path)]  # fmt: skip
        if kind == "gil":
            cmd.append("--gil")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    time.sleep(1.0)  # attached before the work starts
    try:
        yield {k: v for k, v, p in zip(files, files.values(), procs, strict=True) if p.poll() is None}
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def thread_role(name: str) -> str:
    """A thread's stage without its chunk or pool index."""
    return _CHUNK_SUFFIX.sub("", name.strip()) or "?"


def summarise(raw: Path, *, top: int = 25) -> dict[str, Any]:
    """Per thread role: samples, the ``top`` frames by own samples (function and line) and by
    inclusive samples (function, counted once per stack)."""
    if not raw.exists():
        return {"error": f"{raw.name} was not written"}
    own: dict[str, Counter[str]] = defaultdict(Counter)
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    samples: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        match = _THREAD.match(frames[0])
        role = thread_role(match.group("name")) if match else "?"
        frames = frames[1:] if match else frames
        samples[role] += count
        if frames:
            own[role][frames[-1]] += count
        for function in {f.split(" (")[0] for f in frames}:
            inclusive[role][function] += count
    return {
        role: {
            "samples": n,
            "own": own[role].most_common(top),
            "inclusive": inclusive[role].most_common(top),
        }
        for role, n in samples.most_common()
    }
