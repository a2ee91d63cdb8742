"""The inswapper path on generated ONNX graphs with inswapper_128's names, shapes and emap layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from shared.errors import ModelStoreError
from shared.model_store import require_file
from worker.models.arcface import ArcFaceEmbedder
from worker.models.inswapper import InswapperSwapper, read_emap, source_latent
from worker.models.onnx_torch import convert_onnx, load_onnx, max_abs_diff_vs_onnxruntime
from worker.models.source_face import load_source_face


@pytest.fixture(scope="module")
def many_faces(detector, t1_half_rgb: np.ndarray):
    frames = np.stack([t1_half_rgb, t1_half_rgb[:, ::-1].copy()])
    return frames, detector.detect(frames)


@pytest.mark.parametrize("name", ["inswapper_128.onnx", "w600k_r50.onnx"])
def test_torch_conversion_matches_onnxruntime(user_store: Path, name: str) -> None:
    graph = load_onnx(require_file(user_store, name), purpose=name)
    module = convert_onnx(graph, torch.device("cpu"))
    assert module.batches
    rng = np.random.default_rng(0)
    inputs = [
        rng.uniform(0, 1, [d.dim_value for d in v.type.tensor_type.shape.dim]).astype(np.float32)
        for v in graph.graph.input
    ]
    assert max_abs_diff_vs_onnxruntime(graph, module, inputs) < 1e-4


def test_graph_with_hard_coded_batch_falls_back_to_a_per_sample_loop(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Reshape", ["y", "shape"], ["y3"]),  # [4,1,1]: drops the batch axis
        helper.make_node("Add", ["x4", "y3"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "batch_one",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("x4", TensorProto.FLOAT, [1, 4, 2, 2]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 2, 2])],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w"),
            numpy_helper.from_array(np.array([4, 1, 1], dtype=np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    module = convert_onnx(model, torch.device("cpu"))
    assert not module.batches
    x = torch.from_numpy(rng.standard_normal((3, 8)).astype(np.float32))
    x4 = torch.from_numpy(rng.standard_normal((3, 4, 2, 2)).astype(np.float32))
    batched = module(x, x4)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], module(x[i : i + 1], x4[i : i + 1]))


def test_latent_is_the_renormalised_embedding_times_emap(user_store: Path) -> None:
    graph = onnx.load(str(require_file(user_store, "inswapper_128.onnx")))
    emap = read_emap(graph)
    assert emap.shape == (512, 512)
    np.testing.assert_array_equal(emap, numpy_helper.to_array(graph.graph.initializer[-1]))
    emb = np.random.default_rng(1).standard_normal(512).astype(np.float32) * 7.0
    latent = source_latent(emb, emap)
    expected = (emb / np.linalg.norm(emb)) @ emap
    np.testing.assert_allclose(latent[0], expected / np.linalg.norm(expected), rtol=1e-5, atol=1e-6)


def test_inswapper_swaps_many_faces_in_one_batched_call(
    user_store: Path, detector, astronaut_rgb: np.ndarray, many_faces
) -> None:
    frames, faces = many_faces
    assert sum(len(f) for f in faces) == 12
    source = load_source_face(astronaut_rgb, detector)
    swapper = InswapperSwapper.from_store(source, user_store, "cpu")
    batch_sizes: list[int] = []
    swapper.module.graph_module.register_forward_pre_hook(
        lambda _m, args: batch_sizes.append(args[0].shape[0])
    )
    outputs = swapper.swap_batch(frames, faces)
    assert batch_sizes == [12]
    for frame, out, frame_faces in zip(frames, outputs, faces, strict=True):
        assert out.paths == ["inswapper"] * len(frame_faces)
        untouched = out.mask == 0
        assert np.array_equal(out.frame[untouched], frame[untouched])
        assert not np.array_equal(out.frame[~untouched], frame[~untouched])


def test_batched_crops_equal_one_at_a_time(user_store: Path, detector, astronaut_rgb: np.ndarray) -> None:
    source = load_source_face(astronaut_rgb, detector)
    swapper = InswapperSwapper.from_store(source, user_store, "cpu")
    crops = np.random.default_rng(5).integers(0, 255, (5, 128, 128, 3), dtype=np.uint8)
    together = swapper.run_crops(crops)
    apart = np.concatenate([swapper.run_crops(crops[i : i + 1]) for i in range(5)])
    assert np.abs(together.astype(int) - apart.astype(int)).max() <= 1


def test_inswapper_without_user_weights_says_how_to_add_them(
    face_store: Path, detector, astronaut_rgb
) -> None:
    source = load_source_face(astronaut_rgb, detector)
    with pytest.raises(ModelStoreError, match="facefarm models add"):
        InswapperSwapper.from_store(source, face_store, "cpu")


def test_arcface_embeddings_are_unit_vectors_and_batch_consistently(user_store: Path, many_faces) -> None:
    frames, faces = many_faces
    embedder = ArcFaceEmbedder.from_store(user_store, "cpu")
    emb = embedder.embed_faces(frames[0], faces[0])
    assert emb.shape == (6, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    one = embedder.embed_faces(frames[0], faces[0][:1])
    np.testing.assert_allclose(one[0], emb[0], atol=1e-5)
