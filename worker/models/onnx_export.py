"""ONNX export of our torch networks, checked against PyTorch with onnxruntime (CPU).

ONNX is the way into TensorRT (no TensorRT here or on the GPU test machine): every network we run
per frame exports with dynamic batch (and dynamic height/width for the fully convolutional ones),
and ``verify_onnx`` proves the file computes what the torch module does before anyone builds an
engine from it. ``build_tensorrt_engine`` needs the ``tensorrt`` extra and is UNTESTED.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from shared.errors import ExternalToolError
from worker.models.super_res import SrModel

OPSET = 17


@dataclass(frozen=True)
class ExportCheck:
    """How far onnxruntime's outputs are from torch's on the check inputs."""

    path: Path
    max_abs_error: float
    outputs: int


class _FirstOutputs(nn.Module):
    """Wraps a net returning a tuple so the exporter sees plain tensors (names per output)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.net(x)
        return (out,) if isinstance(out, Tensor) else tuple(out)


def export_onnx(
    net: nn.Module,
    example: Tensor,
    path: Path,
    *,
    output_names: list[str],
    spatial_dynamic: bool,
    opset: int = OPSET,
) -> Path:
    """Export ``net`` (fp32, CPU, eval) with input ``input`` and a dynamic batch axis (and H, W)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {0: "batch", 2: "height", 3: "width"} if spatial_dynamic else {0: "batch"}
    dynamic = {"input": axes, **{name: {0: "batch"} for name in output_names}}
    module = _FirstOutputs(net).eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript
        # (absent on the GPU machine); it still writes correct graphs for these conv nets.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=output_names,
            dynamic_axes=dynamic,
        )
    return path


def verify_onnx(
    path: Path, net: nn.Module, inputs: Tensor, *, atol: float = 1e-4, rtol: float = 1e-5
) -> ExportCheck:
    """Run ``path`` with onnxruntime (CPU) and ``net`` with torch on ``inputs``; raise if they differ.

    Allowed error per output: ``atol + rtol * max|torch output|`` (the mesh net outputs pixels).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_outs = session.run(None, {"input": inputs.numpy()})
    with torch.inference_mode():
        torch_outs = _FirstOutputs(net).eval()(inputs)
    if len(ort_outs) != len(torch_outs):
        raise ExternalToolError(f"{path}: {len(ort_outs)} ONNX outputs, torch gives {len(torch_outs)}")
    worst = 0.0
    for got, want in zip(ort_outs, torch_outs, strict=True):
        want_np = want.float().numpy()
        if got.shape != want_np.shape:
            raise ExternalToolError(f"{path}: ONNX output shape {got.shape}, torch {want_np.shape}")
        if not got.size:
            continue
        error = float(np.max(np.abs(got - want_np)))
        allowed = atol + rtol * float(np.max(np.abs(want_np)))
        if not error <= allowed:  # also catches NaN
            raise ExternalToolError(
                f"{path}: ONNX and torch differ by {error:.3g} (> {allowed:.3g}); do not build an engine from it"
            )
        worst = max(worst, error)
    return ExportCheck(path=Path(path), max_abs_error=worst, outputs=len(ort_outs))


def _cpu_fp32(net: nn.Module) -> nn.Module:
    return net.to(device="cpu", dtype=torch.float32).eval()


def export_sr_model(model: SrModel, path: Path, *, check_px: int = 32) -> ExportCheck:
    """RRDBNet / SRVGGNetCompact -> ONNX (dynamic N, H, W), checked on a random ``check_px`` image."""
    net = _cpu_fp32(model.net)
    example = torch.rand(1, 3, check_px, check_px, generator=torch.Generator().manual_seed(0))
    bands = getattr(net, "upsample_band_rows", None)
    if bands is not None:  # a traced band loop would fix the height; export the whole tail
        net.upsample_band_rows = None  # type: ignore[assignment]
    try:
        export_onnx(net, example, path, output_names=["output"], spatial_dynamic=True)
    finally:
        if bands is not None:
            net.upsample_band_rows = bands  # type: ignore[assignment]
    check = torch.rand(2, 3, check_px + 8, check_px, generator=torch.Generator().manual_seed(1))
    return verify_onnx(path, net, check, atol=1e-3)


def export_mtcnn(store: Path, out_dir: Path) -> dict[str, ExportCheck]:
    """P-Net (dynamic N, H, W), R-Net (N,3,24,24) and O-Net (N,3,48,48) from the store's weights."""
    from worker.models.detect_mtcnn import load_mtcnn_nets

    pnet, rnet, onet = (_cpu_fp32(n) for n in load_mtcnn_nets(store, torch.device("cpu")))
    gen = torch.Generator().manual_seed(0)
    out_dir = Path(out_dir)
    checks = {}
    for name, net, size, outputs, spatial in (
        ("pnet", pnet, 24, ["boxes", "probs"], True),
        ("rnet", rnet, 24, ["boxes", "probs"], False),
        ("onet", onet, 48, ["boxes", "points", "probs"], False),
    ):
        path = export_onnx(net, torch.rand(1, 3, size, size, generator=gen), out_dir / f"{name}.onnx",
                           output_names=outputs, spatial_dynamic=spatial)  # fmt: skip
        check_size = (size + 12, size + 20) if spatial else (size, size)
        checks[name] = verify_onnx(path, net, torch.rand(3, 3, *check_size, generator=gen))
    return checks


def export_landmarker(store: Path, path: Path) -> ExportCheck:
    """MediaPipe's face-mesh net (our torch replay of the .tflite) -> ONNX, input (N,3,192,192)."""
    from worker.models.mesh.landmarker import INPUT_PX, load_landmark_net

    net = _cpu_fp32(load_landmark_net(store, "cpu"))
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(1, 3, INPUT_PX, INPUT_PX, generator=gen)
    export_onnx(net, example, path, output_names=["mesh", "presence"], spatial_dynamic=False)
    return verify_onnx(path, net, torch.rand(2, 3, INPUT_PX, INPUT_PX, generator=gen))


def build_tensorrt_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    fp16: bool = True,
    workspace_bytes: int = 4 << 30,
    min_shape: tuple[int, int, int, int] = (1, 3, 64, 64),
    opt_shape: tuple[int, int, int, int] = (1, 3, 1080, 1920),
    max_shape: tuple[int, int, int, int] = (4, 3, 1080, 1920),
) -> Path:
    """Serialise a TensorRT engine for ``onnx_path`` (input named ``input``).

    UNTESTED: neither this machine nor the GPU test machine has TensorRT (``pip install
    facefarm[tensorrt]``). Written against the TensorRT 10 Python API.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExternalToolError(
            "TensorRT is not installed; install the 'tensorrt' extra (facefarm[tensorrt])"
        ) from exc
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExternalToolError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape("input", min_shape, opt_shape, max_shape)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExternalToolError(f"TensorRT could not build an engine from {onnx_path}")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    return engine_path
