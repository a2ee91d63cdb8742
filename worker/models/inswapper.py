"""The ``inswapper`` swapper: insightface's ``inswapper_128.onnx`` (user-supplied) in torch, batched.

Inputs follow insightface: ``target`` = the face aligned to the ArcFace template scaled to 128
(+8 px in x), RGB in [0,1]; ``source`` = the normalised ArcFace embedding times ``emap`` (the
graph's last initializer, 512x512), renormalised. The 128 px result is pasted back through an
eroded, blurred mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from shared.errors import ModelStoreError
from shared.model_store import require_file
from worker.models.align import paste_back, square_mask, warp_face
from worker.models.arcface import ArcFaceEmbedder, normalise_rows
from worker.models.faces import Face, SwapOutput
from worker.models.onnx_torch import convert_onnx, load_onnx
from worker.models.source_face import SourceFace

INSWAPPER_FILE = "inswapper_128.onnx"
INSWAPPER_SIZE_PX = 128


def read_emap(graph: object) -> np.ndarray:
    """The 512x512 source-embedding transform: the graph's last initializer."""
    from onnx import numpy_helper

    inits = graph.graph.initializer  # type: ignore[attr-defined]
    if not inits:
        raise ModelStoreError(f"{INSWAPPER_FILE} has no initializers; it is not insightface's inswapper")
    emap = numpy_helper.to_array(inits[-1])
    if emap.shape != (512, 512):
        raise ModelStoreError(
            f"{INSWAPPER_FILE}: the last initializer has shape {emap.shape}, expected (512, 512) (emap); "
            "use insightface's inswapper_128.onnx"
        )
    return emap.astype(np.float32)


def source_latent(embedding: np.ndarray, emap: np.ndarray) -> np.ndarray:
    """insightface's latent: normalised embedding @ emap, renormalised; shape (1, 512)."""
    normed = normalise_rows(embedding.reshape(1, -1).astype(np.float64))
    latent = normed @ emap.astype(np.float64)
    return normalise_rows(latent).astype(np.float32)


class InswapperSwapper:
    """Swaps faces with inswapper_128, all faces of a batch of frames in one network call."""

    name = "inswapper"

    def __init__(
        self,
        source: SourceFace,
        swapper_path: Path,
        arcface: ArcFaceEmbedder,
        device: torch.device | str,
        *,
        batch_faces: int = 16,
    ) -> None:
        self.device = torch.device(device)
        self.batch_faces = batch_faces
        graph = load_onnx(swapper_path, purpose="inswapper")
        self.onnx_model = graph
        names = [v.name for v in graph.graph.input]
        if "target" not in names or "source" not in names:
            raise ModelStoreError(
                f"{swapper_path} has inputs {names}, expected 'target' and 'source'; use insightface's {INSWAPPER_FILE}"
            )
        self.emap = read_emap(graph)
        self.module = convert_onnx(graph, self.device)
        self._order = [self.module.input_names.index("target"), self.module.input_names.index("source")]
        embedding = arcface.embed_faces(source.image, [source.face])
        self.latent = source_latent(embedding[0], self.emap)
        self._mask = square_mask(INSWAPPER_SIZE_PX)

    @classmethod
    def from_store(
        cls,
        source: SourceFace,
        store: Path,
        device: torch.device | str,
        *,
        arcface: ArcFaceEmbedder | None = None,
    ) -> InswapperSwapper:
        """Load both user-supplied files from the store (ModelStoreError says how to add them)."""
        swapper_path = require_file(Path(store), INSWAPPER_FILE)
        arcface = arcface or ArcFaceEmbedder.from_store(store, device)
        return cls(source, swapper_path, arcface, device)

    @torch.inference_mode()
    def run_crops(self, crops: np.ndarray) -> np.ndarray:
        """(N,128,128,3) uint8 aligned targets -> (N,128,128,3) uint8 swapped faces."""
        outs = []
        latent = torch.from_numpy(self.latent).to(self.device)
        for start in range(0, len(crops), self.batch_faces):
            part = torch.from_numpy(np.ascontiguousarray(crops[start : start + self.batch_faces])).to(
                self.device
            )
            target = part.permute(0, 3, 1, 2).float() / 255.0
            source = latent.expand(len(part), -1).contiguous()
            args: list[torch.Tensor] = [target, source]
            ordered = [args[self._order.index(i)] for i in range(2)]
            out = self.module(*ordered)
            out = out if isinstance(out, torch.Tensor) else out[0]
            out = (out.float().clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
            outs.append(out.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, 128, 128, 3), dtype=np.uint8)

    def swap_batch(self, frames: np.ndarray, faces: Sequence[Sequence[Face]]) -> list[SwapOutput]:
        crops: list[np.ndarray] = []
        matrices: list[np.ndarray] = []
        owners: list[int] = []
        for i, (frame, frame_faces) in enumerate(zip(frames, faces, strict=True)):
            for face in frame_faces:
                crop, m = warp_face(frame, face.landmarks, INSWAPPER_SIZE_PX, replicate_border=False)
                crops.append(crop)
                matrices.append(m)
                owners.append(i)
        swapped = self.run_crops(np.stack(crops)) if crops else np.zeros((0, 128, 128, 3), dtype=np.uint8)
        outputs = [
            SwapOutput(frame=frame.copy(), mask=np.zeros(frame.shape[:2], dtype=np.float32), paths=[])
            for frame in frames
        ]
        for k, owner in enumerate(owners):
            out = outputs[owner]
            out.frame, mask = paste_back(out.frame, swapped[k], self._mask, matrices[k])
            np.maximum(out.mask, mask, out=out.mask)
            out.paths.append(self.name)
        return outputs
