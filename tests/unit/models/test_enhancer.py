"""GFPGAN v1 clean: checkpoints load strictly through the public path and run deterministically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.errors import BadInputError, ModelStoreError
from worker.models.enhancer import enhance_faces, load_face_enhancer
from worker.models.gfpgan_net import GFPGANv1Clean


def _save_random(path: Path, **kwargs: object) -> GFPGANv1Clean:
    torch.manual_seed(0)
    net = GFPGANv1Clean(**kwargs)  # type: ignore[arg-type]
    torch.save({"params_ema": net.state_dict()}, path)
    return net


def test_small_gfpgan_checkpoint_loads_strict_and_is_deterministic(
    tmp_path: Path, astronaut_rgb: np.ndarray
) -> None:
    path = tmp_path / "gfpgan_small.pth"
    _save_random(path, out_size=64, num_style_feat=32, channel_multiplier=1, narrow=0.125)
    model = load_face_enhancer(path, "cpu")
    assert model.size_px == 64
    crops = np.stack([astronaut_rgb[80:144, 190:254], astronaut_rgb[90:154, 180:244]])
    first = enhance_faces(model, crops, batch=2)
    again = enhance_faces(model, crops, batch=2)
    single = enhance_faces(model, crops, batch=1)
    assert first.shape == crops.shape and first.dtype == np.uint8
    assert np.array_equal(first, again)  # stored noise, not fresh random draws
    assert np.abs(first.astype(int) - single.astype(int)).max() <= 1  # batching: rounding only
    assert first.std() > 0


def test_gfpgan_v14_layout_loads_strict(tmp_path: Path) -> None:
    """The v1.4 configuration: 512 px, channel multiplier 2, SFT on half the channels."""
    path = tmp_path / "GFPGANv1.4.pth"
    net = _save_random(path, out_size=512)
    assert sum(t.numel() for t in net.state_dict().values()) == 87_143_276
    keys = net.state_dict().keys()
    assert "stylegan_decoder.style_convs.13.modulated_conv.weight" in keys
    assert "condition_scale.6.2.weight" in keys and "toRGB.6.weight" in keys
    model = load_face_enhancer(path, "cpu")
    assert model.size_px == 512
    assert model.net.stylegan_decoder.sft_half and model.net.different_w


def test_wrong_crop_size_and_foreign_checkpoint_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.pth"
    _save_random(path, out_size=32, num_style_feat=16, channel_multiplier=1, narrow=0.0625)
    model = load_face_enhancer(path, "cpu")
    with pytest.raises(BadInputError, match="32"):
        enhance_faces(model, np.zeros((1, 64, 64, 3), np.uint8))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ModelStoreError, match="GFPGAN"):
        load_face_enhancer(tmp_path / "other.pth", "cpu")


def test_code_carrying_pickle_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"params_ema": {"x": Payload()}}, path)
    with pytest.raises(ModelStoreError, match="evil.pth"):
        load_face_enhancer(path, "cpu")
