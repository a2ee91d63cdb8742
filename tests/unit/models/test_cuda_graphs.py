"""``GraphedModule`` off CUDA: the module runs as it is (the capture path is tests/gpu's)."""

from __future__ import annotations

import torch
from torch import nn

from worker.models.cuda_graphs import GraphedModule, shared_graphed


class _Two(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x.sum()


def test_cpu_inputs_run_the_module_without_capturing():
    graphed = GraphedModule(_Two())
    a, b = graphed(torch.ones(2, 3))
    assert torch.equal(a, torch.full((2, 3), 2.0)) and float(b) == 6.0
    assert graphed.replays == 0 and graphed._graphs == {}


def test_one_shared_module_per_key():
    loads = []

    def load() -> nn.Module:
        loads.append(1)
        return _Two()

    key = ("weights-a", "cpu", "float32")
    assert shared_graphed(key, load) is shared_graphed(key, load) and len(loads) == 1
    assert shared_graphed(("weights-b", "cpu", "float32"), load) is not shared_graphed(key, load)
