"""Load a float TFLite flatbuffer into a torch module, for the few conv ops MediaPipe's face nets use.

The ready-made converters fail on these files (tflite2onnx crashes, onnx2torch rejects SAME_UPPER), so
the graph is replayed op by op. Every rank-4 activation is kept NCHW inside; other ranks keep the TFLite
layout. Constants behind DEQUANTIZE (fp16 weights) are folded to fp32 buffers at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import ModelStoreError

_TYPE_TO_NUMPY = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}
_ACTIVATIONS = {0: "none", 1: "relu", 2: "relu_n1_to_1", 3: "relu6", 4: "tanh"}
_SUPPORTED = {
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "PRELU",
    "ADD",
    "MAX_POOL_2D",
    "PAD",
    "DEQUANTIZE",
    "RELU",
    "RESHAPE",
    "CONCATENATION",
}


@dataclass(frozen=True)
class _Step:
    """One op to replay: its kind, tensor ids and plain-int attributes (ints keep torch.compile happy)."""

    kind: str
    inputs: tuple[int, ...]
    output: int
    attrs: tuple[tuple[str, object], ...]

    def attr(self, name: str) -> Any:
        return dict(self.attrs)[name]


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TFLite SAME padding: the odd pixel goes after (stride-2 3x3 convs pad 0 before, 1 after)."""
    out = -(-size // stride)
    effective = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class TfliteModule(nn.Module):
    """Replays a TFLite graph. ``forward`` takes NCHW inputs; rank-4 outputs come back NHWC like TFLite."""

    def __init__(
        self,
        steps: list[_Step],
        constants: dict[int, torch.Tensor],
        input_ids: list[int],
        output_ids: list[int],
        output_names: list[str],
    ) -> None:
        super().__init__()
        self.steps = steps
        self.input_ids = input_ids
        self.output_ids = output_ids
        self.output_names = output_names
        self.constant_ids = sorted(constants)
        for tid, value in constants.items():
            self.register_buffer(f"c{tid}", value)

    def _const(self, tid: int) -> torch.Tensor:
        return getattr(self, f"c{tid}")

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values: dict[int, torch.Tensor] = dict(zip(self.input_ids, inputs, strict=True))
        for tid in self.constant_ids:
            values[tid] = self._const(tid)
        for step in self.steps:
            values[step.output] = _run_step(step, values)
        outs = []
        for tid in self.output_ids:
            out = values[tid]
            outs.append(out.permute(0, 2, 3, 1) if out.dim() == 4 else out)
        return tuple(outs)


def _activate(x: torch.Tensor, name: object) -> torch.Tensor:
    if name == "none":
        return x
    if name == "relu":
        return F.relu(x)
    if name == "relu6":
        return x.clamp(0.0, 6.0)
    if name == "relu_n1_to_1":
        return x.clamp(-1.0, 1.0)
    return torch.tanh(x)


def _run_step(step: _Step, v: dict[int, torch.Tensor]) -> torch.Tensor:
    kind = step.kind
    x = v[step.inputs[0]]
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        pads = step.attr("pads")
        if pads != (0, 0, 0, 0):
            x = F.pad(x, pads)
        bias = v[step.inputs[2]] if len(step.inputs) > 2 and step.inputs[2] >= 0 else None
        y = F.conv2d(
            x,
            v[step.inputs[1]],
            bias,
            stride=step.attr("stride"),
            dilation=step.attr("dilation"),
            groups=step.attr("groups"),
        )
        return _activate(y, step.attr("act"))
    if kind == "PRELU":
        return F.prelu(x, v[step.inputs[1]])
    if kind == "RELU":
        return F.relu(x)
    if kind == "ADD":
        return _activate(x + v[step.inputs[1]], step.attr("act"))
    if kind == "MAX_POOL_2D":
        return _activate(_max_pool(x, step), step.attr("act"))
    if kind == "PAD":
        return F.pad(x, step.attr("pads"))
    if kind == "RESHAPE":
        if x.dim() == 4:
            x = x.permute(0, 2, 3, 1)
        return x.reshape((x.shape[0], *step.attr("shape")))
    if kind == "CONCATENATION":
        y = torch.cat([v[i] for i in step.inputs], dim=step.attr("axis"))
        return _activate(y, step.attr("act"))
    raise ModelStoreError(f"TFLite op {kind} has no torch replay; the model file is not a supported one")


def _max_pool(x: torch.Tensor, step: _Step) -> torch.Tensor:
    kernel, stride, pads = step.attr("kernel"), step.attr("stride"), step.attr("pads")
    if kernel == (2, 2) and stride == (2, 2) and pads == (0, 0, 0, 0):
        # Strided max is ~4x faster than F.max_pool2d on CPU (which computes indices) and exact.
        a = torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2])
        b = torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2])
        return torch.maximum(a, b)
    if pads != (0, 0, 0, 0):
        x = F.pad(x, pads, value=float("-inf"))
    return F.max_pool2d(x, kernel, stride)


class _Graph:
    """The parsed flatbuffer: tensors, constant data and ops, with TFLite's own shapes."""

    def __init__(self, data: bytes, source: str) -> None:
        import tflite  # parser only; imported here so nothing loads at import time

        self.tfl = tflite
        try:
            self.model = tflite.Model.GetRootAsModel(data, 0)
        except Exception as exc:  # flatbuffers raises plain errors on garbage
            raise ModelStoreError(
                f"{source} is not a TFLite flatbuffer; re-run `facefarm models fetch`"
            ) from exc
        if self.model.SubgraphsLength() != 1:
            raise ModelStoreError(f"{source} has {self.model.SubgraphsLength()} subgraphs; expected 1")
        self.graph = self.model.Subgraphs(0)
        self.source = source
        codes = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
        self.op_names = []
        for i in range(self.model.OperatorCodesLength()):
            oc = self.model.OperatorCodes(i)
            self.op_names.append(codes.get(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()), "CUSTOM"))

    def shape(self, tid: int) -> tuple[int, ...]:
        return tuple(int(s) for s in self.graph.Tensors(tid).ShapeAsNumpy())

    def constant(self, tid: int) -> np.ndarray | None:
        tensor = self.graph.Tensors(tid)
        buf = self.model.Buffers(tensor.Buffer())
        if buf is None or buf.DataLength() == 0:
            return None
        dtype = _TYPE_TO_NUMPY.get(tensor.Type())
        if dtype is None:
            raise ModelStoreError(f"{self.source}: tensor type {tensor.Type()} is not supported")
        return np.frombuffer(buf.DataAsNumpy().tobytes(), dtype=dtype).reshape(self.shape(tid))

    def options(self, op: Any, cls: type) -> Any:
        table = op.BuiltinOptions()
        opts = cls()
        opts.Init(table.Bytes, table.Pos)
        return opts


def load_tflite(path: Path) -> TfliteModule:
    """Build a float32 torch module from a TFLite file (fp16 constants folded, NCHW activations)."""
    if not path.is_file():
        raise ModelStoreError(f"model file {path} is missing; run `facefarm models fetch`")
    g = _Graph(path.read_bytes(), str(path))
    tfl = g.tfl
    consts: dict[int, np.ndarray] = {}
    steps: list[_Step] = []
    graph = g.graph
    for oi in range(graph.OperatorsLength()):
        op = graph.Operators(oi)
        kind = g.op_names[op.OpcodeIndex()]
        if kind not in _SUPPORTED:
            raise ModelStoreError(f"{path} uses TFLite op {kind}, which the torch loader does not replay")
        ins = [int(i) for i in op.InputsAsNumpy()]
        for i in ins:
            if i >= 0 and i not in consts:
                c = g.constant(i)
                if c is not None:
                    consts[i] = c
        out = int(op.OutputsAsNumpy()[0])
        if kind == "DEQUANTIZE":
            if ins[0] not in consts:
                raise ModelStoreError(f"{path}: DEQUANTIZE of a non-constant is not supported")
            consts[out] = consts[ins[0]].astype(np.float32)
            continue
        steps.append(_make_step(g, tfl, op, kind, ins, out, consts))
    used = {i for s in steps for i in s.inputs}
    constants = {tid: _to_torch_layout(tid, steps, consts[tid]) for tid in consts if tid in used}
    input_ids = [int(graph.Inputs(i)) for i in range(graph.InputsLength())]
    output_ids = [int(graph.Outputs(i)) for i in range(graph.OutputsLength())]
    names = [graph.Tensors(t).Name().decode() for t in output_ids]
    return TfliteModule(steps, constants, input_ids, output_ids, names).eval()


def _make_step(
    g: _Graph, tfl: Any, op: Any, kind: str, ins: list[int], out: int, consts: dict[int, np.ndarray]
) -> _Step:
    t = tfl
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        depthwise = kind == "DEPTHWISE_CONV_2D"
        o = g.options(op, t.DepthwiseConv2DOptions if depthwise else t.Conv2DOptions)
        _, h, w, c_in = g.shape(ins[0])
        kshape = g.shape(ins[1])
        kh, kw = kshape[1], kshape[2]
        stride = (int(o.StrideH()), int(o.StrideW()))
        dil = (int(o.DilationHFactor()), int(o.DilationWFactor()))
        pads = (0, 0, 0, 0)
        if o.Padding() == 0:  # SAME
            top, bottom = _same_pads(h, kh, stride[0], dil[0])
            left, right = _same_pads(w, kw, stride[1], dil[1])
            pads = (left, right, top, bottom)
        attrs = {
            "stride": stride,
            "dilation": dil,
            "pads": pads,
            "groups": c_in if depthwise else 1,
            "act": _ACTIVATIONS[int(o.FusedActivationFunction())],
        }
    elif kind == "MAX_POOL_2D":
        o = g.options(op, t.Pool2DOptions)
        _, h, w, _ = g.shape(ins[0])
        kernel = (int(o.FilterHeight()), int(o.FilterWidth()))
        stride = (int(o.StrideH()), int(o.StrideW()))
        pads = (0, 0, 0, 0)
        if o.Padding() == 0:
            top, bottom = _same_pads(h, kernel[0], stride[0], 1)
            left, right = _same_pads(w, kernel[1], stride[1], 1)
            pads = (left, right, top, bottom)
        attrs = {
            "kernel": kernel,
            "stride": stride,
            "pads": pads,
            "act": _ACTIVATIONS[int(o.FusedActivationFunction())],
        }
    elif kind == "ADD":
        o = g.options(op, t.AddOptions)
        attrs = {"act": _ACTIVATIONS[int(o.FusedActivationFunction())]}
    elif kind == "PAD":
        spec = consts[ins[1]].astype(int)
        rank = len(g.shape(ins[0]))
        if rank == 4:  # NHWC spec -> NCHW axes, then F.pad's last-axis-first order
            spec = spec[[0, 3, 1, 2]]
        attrs = {"pads": tuple(int(v) for v in spec[::-1].reshape(-1))}
        ins = ins[:1]
    elif kind == "RESHAPE":
        attrs = {"shape": tuple(int(s) for s in g.shape(out)[1:])}
        ins = ins[:1]
    elif kind == "CONCATENATION":
        o = g.options(op, t.ConcatenationOptions)
        axis = int(o.Axis())
        rank = len(g.shape(ins[0]))
        axis = axis % rank
        if rank == 4:
            axis = (0, 2, 3, 1)[axis]
        attrs = {"axis": axis, "act": _ACTIVATIONS[int(o.FusedActivationFunction())]}
    else:  # PRELU, RELU
        attrs = {}
    return _Step(kind, tuple(ins), out, tuple(sorted(attrs.items())))


def _to_torch_layout(tid: int, steps: list[_Step], value: np.ndarray) -> torch.Tensor:
    """Permute a constant into the layout of the op that consumes it (filters, PReLU slopes, biases)."""
    for s in steps:
        if tid not in s.inputs:
            continue
        slot = s.inputs.index(tid)
        if s.kind == "CONV_2D" and slot == 1:  # OHWI -> OIHW
            value = value.transpose(0, 3, 1, 2)
        elif s.kind == "DEPTHWISE_CONV_2D" and slot == 1:  # [1,H,W,C*m] -> [C*m,1,H,W]
            value = value.transpose(3, 0, 1, 2)
        elif s.kind == "PRELU" and slot == 1:
            if value.size != value.shape[-1]:
                raise ModelStoreError("PReLU with spatial slopes is not supported by the torch loader")
            value = value.reshape(-1)
        elif s.kind == "ADD" and value.ndim >= 1 and value.size > 1:
            value = value.reshape(1, -1, 1, 1)
        break
    return torch.from_numpy(np.ascontiguousarray(value.astype(np.float32)))
