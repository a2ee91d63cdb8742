"""Run user-supplied ONNX models in torch (CUDA, batching) via onnx2torch, checked against onnxruntime.

The GPU machines have only CPU onnxruntime and insightface's ONNX files have a fixed batch of 1,
so we convert once, free the batch dimension where the graph hard-codes it, and fall back to a
per-sample loop when the converted graph does not batch correctly.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.errors import ModelStoreError

_IMPORT_LOCK = threading.Lock()


def _missing_torchvision(*_args: Any, **_kwargs: Any) -> Any:
    raise ModelStoreError(
        "this ONNX model uses NMS/RoIAlign ops that need torchvision, which is not available"
    )


def import_onnx2torch() -> types.ModuleType:
    """Import onnx2torch without torchvision (it imports it only for the NMS/RoIAlign converters).

    A stand-in module is visible in ``sys.modules`` only during the import, so nobody else sees it.
    """
    with _IMPORT_LOCK:
        if "onnx2torch" in sys.modules:
            return sys.modules["onnx2torch"]
        try:
            import torchvision  # noqa: F401
        except ImportError:
            pass
        else:
            import onnx2torch

            return onnx2torch
        shim = types.ModuleType("torchvision")
        ops = types.ModuleType("torchvision.ops")
        for name in ("nms", "box_convert", "roi_align"):
            setattr(ops, name, _missing_torchvision)
        shim.ops = ops  # type: ignore[attr-defined]
        sys.modules["torchvision"] = shim
        sys.modules["torchvision.ops"] = ops
        try:
            import onnx2torch
        finally:
            sys.modules.pop("torchvision", None)
            sys.modules.pop("torchvision.ops", None)
        return onnx2torch


def load_onnx(path: Path, *, purpose: str) -> Any:
    """Load an ONNX graph, translating parse errors into ``ModelStoreError``."""
    import onnx

    if not Path(path).is_file():
        raise ModelStoreError(f"{purpose} weights {path} are missing", path=str(path))
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise ModelStoreError(
            f"{purpose} weights {path} are not a valid ONNX file ({exc}); replace the file", path=str(path)
        ) from exc


def free_batch_dim(model: Any) -> Any:
    """A copy of the graph whose inputs/outputs have a symbolic batch and whose constant Reshape
    targets starting with 1 copy the batch from their input instead (ONNX ``0`` = keep that dim)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 0 and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = "batch"
    shape_inputs = {node.input[1] for node in graph.node if node.op_type == "Reshape" and len(node.input) > 1}
    for init in graph.initializer:
        if init.name in shape_inputs:
            arr = numpy_helper.to_array(init)
            if arr.ndim == 1 and arr.size >= 2 and arr[0] == 1:
                arr = arr.copy()
                arr[0] = 0
                init.CopyFrom(numpy_helper.from_array(arr.astype(np.int64), init.name))
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in shape_inputs:
            for attr in node.attribute:
                if attr.name == "value":
                    arr = numpy_helper.to_array(attr.t)
                    if arr.ndim == 1 and arr.size >= 2 and arr[0] == 1:
                        arr = arr.copy()
                        arr[0] = 0
                        attr.t.CopyFrom(numpy_helper.from_array(arr.astype(np.int64)))
    return model


class TorchOnnxModel(nn.Module):
    """A converted ONNX graph called with tensors in the graph's input order; batches when it can."""

    def __init__(self, graph_module: nn.Module, input_names: Sequence[str], *, batches: bool) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.input_names = list(input_names)
        self.batches = batches

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.batches or inputs[0].shape[0] == 1:
            return self.graph_module(*inputs)
        outs = [self.graph_module(*(x[i : i + 1] for x in inputs)) for i in range(inputs[0].shape[0])]
        if isinstance(outs[0], torch.Tensor):
            return torch.cat(outs)  # type: ignore[arg-type]
        return tuple(torch.cat([o[k] for o in outs]) for k in range(len(outs[0])))


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _sample_inputs(model: Any, batch: int, seed: int) -> list[np.ndarray]:
    """Random inputs for every graph input, with the batch dimension set to ``batch``."""
    rng = np.random.default_rng(seed)
    initializer_names = {init.name for init in model.graph.initializer}
    arrays = []
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]
        dims[0] = batch
        arrays.append(rng.uniform(0.0, 1.0, size=dims).astype(np.float32))
    return arrays


def graph_input_names(model: Any) -> list[str]:
    """Graph inputs that are real inputs (older exporters list initializers as inputs too)."""
    initializer_names = {init.name for init in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in initializer_names]


def convert_onnx(
    model: Any, device: torch.device, *, check_batch: int = 2, tolerance: float = 5e-3
) -> TorchOnnxModel:
    """Convert to torch on ``device``; batches only if a batch of ``check_batch`` matches per-sample runs.

    The tolerance is relative to the output's magnitude: TF32 convolutions on CUDA differ between
    batch sizes by ~1e-4, while a graph that hard-codes batch 1 fails or differs grossly.
    """
    onnx2torch = import_onnx2torch()
    names = graph_input_names(model)
    try:
        graph_module = onnx2torch.convert(free_batch_dim(model))
    except Exception as exc:
        raise ModelStoreError(f"cannot convert the ONNX graph to torch ({exc})") from exc
    graph_module = graph_module.to(device).eval()
    wrapped = TorchOnnxModel(graph_module, names, batches=False)
    batches = False
    if check_batch > 1:
        inputs = [torch.from_numpy(a).to(device) for a in _sample_inputs(model, check_batch, seed=1)]
        with torch.inference_mode():
            try:
                batched = _as_tuple(graph_module(*inputs))
                single = _as_tuple(wrapped(*inputs))
                batches = all(
                    b.shape == s.shape
                    and float((b - s).abs().max()) <= tolerance * (1.0 + float(s.abs().max()))
                    for b, s in zip(batched, single, strict=True)
                )
            except Exception:  # the graph hard-codes batch 1 somewhere we could not free
                batches = False
    wrapped.batches = batches
    return wrapped


def max_abs_diff_vs_onnxruntime(model: Any, module: TorchOnnxModel, inputs: Sequence[np.ndarray]) -> float:
    """Run the original graph in onnxruntime (CPU) and the converted module; the worst output diff.

    Inputs must have batch 1 (the original graph's fixed batch).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {name: arr for name, arr in zip(module.input_names, inputs, strict=True)}
    ref = session.run(None, feeds)
    device = next(module.parameters(), torch.zeros(0)).device
    with torch.inference_mode():
        got = _as_tuple(module(*(torch.from_numpy(a).to(device) for a in inputs)))
    return max(float(np.abs(r - g.float().cpu().numpy()).max()) for r, g in zip(ref, got, strict=True))


def check_against_onnxruntime(
    model: Any, module: TorchOnnxModel, *, tolerance: float = 1e-3, purpose: str
) -> float:
    """Refuse a conversion that disagrees with onnxruntime on a random batch-1 input."""
    diff = max_abs_diff_vs_onnxruntime(model, module, _sample_inputs(model, 1, seed=2))
    if not diff <= tolerance:
        raise ModelStoreError(
            f"{purpose}: the torch conversion differs from onnxruntime by {diff:.3g} (> {tolerance}); "
            "the ONNX file uses ops onnx2torch does not reproduce"
        )
    return diff
