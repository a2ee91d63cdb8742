"""ArcFace identity embeddings (user-supplied insightface ``w600k_r50.onnx``), run in torch.

Used for inswapper's source latent and for the ``reference`` face selector.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from shared.model_store import require_file
from worker.models.align import warp_face
from worker.models.faces import Face
from worker.models.onnx_torch import convert_onnx, load_onnx

ARCFACE_FILE = "w600k_r50.onnx"
ARCFACE_SIZE_PX = 112


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise each row (embeddings compare by direction)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ArcFaceEmbedder:
    """Embeds ArcFace-aligned 112x112 RGB crops into unit 512-d vectors."""

    def __init__(self, path: Path, device: torch.device | str, *, batch_faces: int = 32) -> None:
        self.device = torch.device(device)
        self.batch_faces = batch_faces
        graph = load_onnx(path, purpose="ArcFace")
        self.onnx_model = graph
        # insightface: graphs that start with their own Sub/Mul take raw pixels (mean 0, std 1).
        first_ops = {node.op_type for node in graph.graph.node[:8]}
        raw_pixels = bool(first_ops & {"Sub", "Mul"})
        self.input_mean = 0.0 if raw_pixels else 127.5
        self.input_std = 1.0 if raw_pixels else 127.5
        self.module = convert_onnx(graph, self.device)

    @classmethod
    def from_store(cls, store: Path, device: torch.device | str) -> ArcFaceEmbedder:
        """Load ``w600k_r50.onnx`` from the store (ModelStoreError says how to add it)."""
        return cls(require_file(Path(store), ARCFACE_FILE), device)

    @torch.inference_mode()
    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """(N,112,112,3) uint8 RGB aligned crops -> (N,512) float32 unit vectors."""
        if len(crops) == 0:
            return np.zeros((0, 512), dtype=np.float32)
        outs = []
        for start in range(0, len(crops), self.batch_faces):
            x = torch.from_numpy(np.ascontiguousarray(crops[start : start + self.batch_faces])).to(
                self.device
            )
            x = (x.permute(0, 3, 1, 2).float() - self.input_mean) / self.input_std
            out = self.module(x)
            emb = out if isinstance(out, torch.Tensor) else out[0]
            outs.append(emb.float().reshape(emb.shape[0], -1).cpu().numpy())
        return normalise_rows(np.concatenate(outs)).astype(np.float32)

    def embed_faces(self, frame: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
        """Unit embeddings of the given faces of one RGB frame."""
        crops = [warp_face(frame, f.landmarks, ARCFACE_SIZE_PX, replicate_border=False)[0] for f in faces]
        if not crops:
            return np.zeros((0, 512), dtype=np.float32)
        return self.embed_crops(np.stack(crops))
