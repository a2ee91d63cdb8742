"""Fixtures for the runtime tests: small fake models and the real model store."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from tests.unit.models.conftest import astronaut_rgb, model_store  # noqa: F401  (re-exported fixtures)


def fake_model(n_params: int) -> nn.Module:
    """A module holding exactly ``n_params`` fp32 parameters plus one buffer."""
    net = nn.Linear(n_params - 1, 1, bias=True) if n_params > 1 else nn.Linear(1, 1, bias=False)
    net.register_buffer("scale", torch.ones(1))
    return net


@pytest.fixture
def fake_loader() -> tuple[Callable[[str], nn.Module], list[str]]:
    """Models named ``m<kib>`` hold <kib> KiB of fp32 weights; returns the loader and its call log."""
    calls: list[str] = []

    def load(name: str) -> nn.Module:
        calls.append(name)
        kib = int(name.split("-")[0][1:])
        return fake_model(kib * 256)

    return load, calls
