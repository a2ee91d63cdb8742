"""``GraphedModule`` on CUDA: the eager module's outputs, from one capture per shape, safe across
threads; a module that cannot be captured runs eagerly.

Run on the GPU machine: ``FACEFARM_TEST_MODEL_STORE=<store> pytest -m gpu tests/gpu/test_cuda_graphs_gpu.py``.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from worker.models.cuda_graphs import GraphedModule

pytestmark = pytest.mark.gpu


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.conv(x))
        return y, y.mean(dim=(1, 2, 3))


class _Syncing(_Pair):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, m = super().forward(x)
        if float(m.sum()) > -1.0:  # a host read: not capturable
            return y, m
        return y, m


@torch.inference_mode()
def test_replays_give_the_eager_outputs_for_each_shape(cuda):
    net = _Pair().to(cuda).eval()
    graphed = GraphedModule(net)
    for n in (1, 4, 4, 1, 4):
        x = torch.randn(n, 3, 32, 32, device=cuda)
        got, want = graphed(x), net(x)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    assert graphed.replays == 5 and len(graphed._graphs) == 2


@torch.inference_mode()
def test_outputs_survive_the_next_replay_and_threads_do_not_mix(cuda):
    net = _Pair().to(cuda).eval()
    graphed = GraphedModule(net)
    inputs = [torch.randn(2, 3, 32, 32, device=cuda) for _ in range(8)]
    first = graphed(inputs[0])
    graphed(inputs[1])  # same shape: reuses the static outputs, which ``first`` must not alias
    torch.testing.assert_close(first[0], net(inputs[0])[0])
    results: dict[int, list[tuple[torch.Tensor, ...]]] = {}

    def work(k: int) -> None:
        stream = torch.cuda.Stream(cuda)
        with torch.inference_mode(), torch.cuda.stream(stream):
            results[k] = [graphed(x) for x in inputs for _ in range(3)]
        stream.synchronize()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(3):
        for i, out in enumerate(results[k]):
            torch.testing.assert_close(out[0], net(inputs[i // 3])[0])


@torch.inference_mode()
def test_a_module_that_reads_the_host_runs_eagerly(cuda):
    net = _Syncing().to(cuda).eval()
    graphed = GraphedModule(net)
    x = torch.randn(2, 3, 16, 16, device=cuda)
    got = graphed(x)
    torch.testing.assert_close(got[0], net(x)[0])
    assert graphed._graphs[(tuple(x.shape), tuple(x.stride()), x.dtype)] is None and graphed.replays == 0
    torch.testing.assert_close(graphed(x)[1], net(x)[1])  # the device still works afterwards
