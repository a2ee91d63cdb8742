"""One device copy of a host batch of frames, shared by the stages that read it.

Detection and the mesh landmarks both read the whole decoded batch on the GPU; a 1080p batch of 8
frames is 50 MB, so uploading it once for both saves a pinned staging copy and a transfer per batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class _Entry:
    host: np.ndarray  # held, so its id cannot name another array while the entry lives
    tensor: torch.Tensor
    ready: torch.cuda.Event | None
    stream: torch.cuda.Stream | None


class FramesOnDevice:
    """The device copies of the last ``keep`` host batches (at most ``max_bytes``), keyed by the array
    object.

    ``get`` from another CUDA stream (a detection thread one batch ahead) waits for the upload on the
    device and marks the tensor as used there, so the allocator cannot hand it out early. The copy is
    made once: a caller that later writes into a batch (the render worker's in-place blend, after
    detection and tracking) must not ``get`` it again.
    """

    def __init__(self, device: torch.device, keep: int = 6, max_bytes: int = 1 << 30) -> None:
        self.device = torch.device(device)
        self.keep = max(1, keep)
        self.max_bytes = max_bytes  # 4K batches are 200 MB: fewer of them are kept
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.uploads = 0  # how many batches went up (a test checks the sharing)

    def get(self, frames: np.ndarray) -> torch.Tensor:
        """(N,H,W,3) uint8 on the device for host ``frames``, uploaded on its first request only."""
        with self._lock:
            entry = self._entries.get(id(frames))
            if entry is not None and entry.host is frames:
                self._entries.move_to_end(id(frames))
                return self._use(entry)
        entry = self._upload(frames)
        with self._lock:
            self._entries[id(frames)] = entry
            self._entries.move_to_end(id(frames))
            while len(self._entries) > 1 and (
                len(self._entries) > self.keep
                or sum(e.tensor.nbytes for e in self._entries.values()) > self.max_bytes
            ):
                self._entries.popitem(last=False)
            self.uploads += 1
        return entry.tensor

    def _upload(self, frames: np.ndarray) -> _Entry:
        host = torch.from_numpy(np.ascontiguousarray(frames))
        if self.device.type != "cuda":
            return _Entry(frames, host.to(self.device), None, None)
        # pinned and queued: a pageable copy would wait for every kernel queued on the stream
        tensor = host.pin_memory().to(self.device, non_blocking=True)
        ready = torch.cuda.Event()
        stream = torch.cuda.current_stream(self.device)
        ready.record(stream)
        return _Entry(frames, tensor, ready, stream)

    def _use(self, entry: _Entry) -> torch.Tensor:
        if entry.ready is None or entry.stream is None:
            return entry.tensor
        current = torch.cuda.current_stream(self.device)
        if current != entry.stream:
            current.wait_event(entry.ready)
            entry.tensor.record_stream(current)
        return entry.tensor
