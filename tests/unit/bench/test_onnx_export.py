"""ONNX exports compute what the torch networks compute (onnxruntime, CPU)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from shared.errors import ExternalToolError
from worker.models.onnx_export import (
    build_tensorrt_engine,
    export_landmarker,
    export_mtcnn,
    export_onnx,
    export_sr_model,
    verify_onnx,
)
from worker.models.sr_nets import RRDBNet, SRVGGNetCompact
from worker.models.super_res import SrModel, load_sr_model


def _tiny(net: torch.nn.Module) -> SrModel:
    return SrModel(name="tiny", net=net.eval(), scale=4, device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RRDBNet(num_block=1, num_feat=8, num_grow_ch=4),
        lambda: SRVGGNetCompact(num_feat=8, num_conv=2),
    ],
)
def test_sr_nets_export_with_dynamic_size_and_match_torch(seeded: None, tmp_path: Path, make) -> None:
    check = export_sr_model(_tiny(make()), tmp_path / "sr.onnx", check_px=16)
    assert check.max_abs_error < 1e-4
    graph = onnx.load(str(tmp_path / "sr.onnx"))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]


def test_shipped_compact_sr_exports(model_store: Path, tmp_path: Path) -> None:
    check = export_sr_model(
        load_sr_model("realesr-animevideov3", model_store), tmp_path / "anime.onnx", check_px=16
    )
    assert check.max_abs_error < 1e-3


def test_verify_rejects_a_file_of_another_network(seeded: None, tmp_path: Path) -> None:
    a, b = SRVGGNetCompact(num_feat=4, num_conv=1).eval(), SRVGGNetCompact(num_feat=4, num_conv=1).eval()
    path = export_onnx(
        a, torch.rand(1, 3, 8, 8), tmp_path / "a.onnx", output_names=["output"], spatial_dynamic=True
    )
    with pytest.raises(ExternalToolError, match="differ"):
        verify_onnx(path, b, torch.rand(1, 3, 8, 8))


def test_mtcnn_nets_export_and_match(model_store: Path, tmp_path: Path) -> None:
    checks = export_mtcnn(model_store, tmp_path)
    assert set(checks) == {"pnet", "rnet", "onet"}
    assert checks["onet"].outputs == 3
    assert all(c.max_abs_error < 1e-4 for c in checks.values())


def test_face_mesh_net_exports_and_matches(model_store: Path, tmp_path: Path) -> None:
    check = export_landmarker(model_store, tmp_path / "mesh.onnx")
    assert check.outputs == 2


def test_tensorrt_builder_says_how_to_install_it(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ExternalToolError, match="tensorrt"):
            build_tensorrt_engine(tmp_path / "x.onnx", tmp_path / "x.engine")
    else:
        pytest.skip("TensorRT is installed; the builder is exercised on the GPU machine only")
