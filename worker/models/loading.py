"""Safe, local loading of weight files: tensors only, never arbitrary pickled code.

``torch.load(weights_only=True)`` refuses pickles that would run code; ``.safetensors`` cannot
carry code at all. Every failure becomes a ModelStoreError that names the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from shared.errors import ModelStoreError

# Where training checkpoints nest the weights (basicsr/GFPGAN use params_ema, then params).
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "net_g")


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Read a ``.pth``/``.pt``/``.safetensors`` file into a flat ``{name: tensor}`` dict."""
    if not path.is_file():
        raise ModelStoreError(
            f"weight file {path} does not exist; add it with `facefarm models add` or check the path",
            path=str(path),
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip/pickle, code-carrying pickle, bad header
        raise ModelStoreError(
            f"weight file {path} cannot be read safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); replace it with an intact "
            "state-dict file",
            path=str(path),
        ) from exc
    return unwrap_state_dict(raw, source=str(path))


def unwrap_state_dict(raw: object, *, source: str) -> dict[str, Tensor]:
    """Take the tensors out of a checkpoint: unnest known wrapper keys, drop ``module.``."""
    obj = raw
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ModelStoreError(f"{source} holds no state dict of tensors", path=source)
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ModelStoreError(f"{source} holds no tensors", path=source)
    return {k.removeprefix("module."): v for k, v in tensors.items()}
