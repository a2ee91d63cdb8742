"""A module replayed from CUDA graphs, one per input shape, for fixed-shape work run many times a chunk.

Why: MTCNN's first stage (integral image, eleven pyramid levels, P-Net on each) is ~600 small torch
ops a 1080p batch, run in the render worker's face thread, its bottleneck. Launching them one by one
from Python, each op giving up and taking back the GIL that four other stage threads want, held that
thread far longer than the GPU took to run them. A graph replays them with one launch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: Tensor
    outputs: tuple[Tensor, ...]


class GraphedModule:
    """``module(x)`` (a tuple of tensors out) from a CUDA graph captured on the first call per shape.

    Thread-safe: replays are serialised, the outputs are cloned before the lock is released, and the
    next replay's stream waits for those clones. A shape whose capture fails runs eagerly from then on
    (logged once); so does everything off CUDA. Captures run in ``thread_local`` mode, so the render
    worker's other threads keep using the GPU while one is captured.
    """

    def __init__(self, module: nn.Module, *, warmup_runs: int = 2) -> None:
        self.module = module
        self.warmup_runs = warmup_runs
        self._graphs: dict[tuple[tuple[int, ...], tuple[int, ...], torch.dtype], _Graph | None] = {}
        self._lock = threading.Lock()
        self._done: torch.cuda.Event | None = None  # recorded after the last replay's clones
        self.replays = 0

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.device.type != "cuda":
            return tuple(self.module(x))
        key = (tuple(x.shape), tuple(x.stride()), x.dtype)
        with self._lock:
            if key not in self._graphs:
                self._graphs[key] = self._capture(x)
            graph = self._graphs[key]
            if graph is None:
                return tuple(self.module(x))
            stream = torch.cuda.current_stream(x.device)
            if self._done is not None:
                stream.wait_event(self._done)  # the last replay's outputs were copied out
            graph.inputs.copy_(x)
            graph.graph.replay()
            outputs = tuple(t.clone() for t in graph.outputs)
            done = torch.cuda.Event()
            done.record(stream)
            self._done = done
            self.replays += 1
            return outputs

    def _capture(self, x: Tensor) -> _Graph | None:
        device = x.device
        try:
            inputs = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
            inputs.copy_(x)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # lazy initialisation and cuDNN plans, outside the capture
                for _ in range(self.warmup_runs):
                    self.module(inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = tuple(self.module(inputs))
        except RuntimeError as exc:  # an op that cannot be captured: this shape runs eagerly
            log.warning("CUDA graph capture of %s for %s failed (%s); running it eagerly",
                        type(self.module).__name__, tuple(x.shape), exc)  # fmt: skip
            return None
        return _Graph(graph, inputs, outputs)


_SHARED: dict[tuple[str, ...], GraphedModule] = {}
_SHARED_LOCK = threading.Lock()


def shared_graphed(key: tuple[str, ...], load: Callable[[], nn.Module]) -> GraphedModule:
    """One ``GraphedModule`` per key (weights file, device, options) per process, so the render
    worker's chunks (each builds its own face engine) capture each shape once, not once a chunk."""
    with _SHARED_LOCK:
        module = _SHARED.get(key)
        if module is None:
            module = _SHARED[key] = GraphedModule(load())
        return module
