"""A random-initialised face swapper of inswapper_128's size and shape, for timing only.

inswapper_128 is not ours to ship, but its cost is what a learned swapper costs: a 128 px face in,
an encoder down to 1024 channels at 32x32, six style-modulated (AdaIN) residual blocks driven by the
512-d source latent, a decoder back to 128 px. This net has the same layout and ~138 M parameters
(inswapper_128.onnx: 554 MB of fp32), so its milliseconds per face stand in for the real one's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FACE_PX = 128
LATENT_DIM = 512
BOTTLENECK_CH = 1024
STYLE_BLOCKS = 6
INSWAPPER_PARAMS = 138_000_000  # about; the test allows 2 %


class StyleBlock(nn.Module):
    """Two 3x3 convs, each instance-normalised and re-styled by the latent (AdaIN), plus a skip."""

    def __init__(self, channels: int = BOTTLENECK_CH, latent_dim: int = LATENT_DIM) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.style1 = nn.Linear(latent_dim, 2 * channels)
        self.style2 = nn.Linear(latent_dim, 2 * channels)

    @staticmethod
    def _adain(x: Tensor, style: Tensor) -> Tensor:
        gamma, beta = style[:, :, None, None].chunk(2, dim=1)
        return F.instance_norm(x) * (1.0 + gamma) + beta

    def forward(self, x: Tensor, latent: Tensor) -> Tensor:
        y = F.relu(self._adain(self.conv1(x), self.style1(latent)))
        y = self._adain(self.conv2(y), self.style2(latent))
        return x + y


class SwapperLike(nn.Module):
    """target (N,3,128,128) in [0,1] + latent (N,512) -> swapped face (N,3,128,128) in [0,1]."""

    def __init__(self, base_ch: int = BOTTLENECK_CH // 8) -> None:
        super().__init__()
        b = base_ch  # 128 gives inswapper's size; smaller widths are for CPU smoke runs only
        self.encoder = nn.Sequential(
            nn.Conv2d(3, b, 7, 1, 3), nn.LeakyReLU(0.2),
            nn.Conv2d(b, 2 * b, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * b, 4 * b, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * b, 8 * b, 3, 1, 1), nn.LeakyReLU(0.2),
        )  # fmt: skip
        self.blocks = nn.ModuleList(StyleBlock(8 * b) for _ in range(STYLE_BLOCKS))
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(8 * b, 4 * b, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(4 * b, 2 * b, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * b, b, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(b, 3, 7, 1, 3),
        )  # fmt: skip

    def forward(self, target: Tensor, latent: Tensor) -> Tensor:
        x = self.encoder(target * 2.0 - 1.0)
        for block in self.blocks:
            x = block(x, latent)
        return torch.sigmoid(self.decoder(x))


class BoundLatent(nn.Module):
    """The swapper with one source latent fixed, as in a job: a one-input module (graphable)."""

    def __init__(self, net: SwapperLike, latent: Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("latent", latent.reshape(1, -1))

    def forward(self, target: Tensor) -> Tensor:
        latent = self.get_buffer("latent").to(target.dtype).expand(target.shape[0], -1)
        return self.net(target, latent)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def create_swapper_like(
    device: torch.device, dtype: torch.dtype, *, seed: int = 0, base_ch: int = BOTTLENECK_CH // 8
) -> BoundLatent:
    """The random swapper on ``device`` in ``dtype`` with a random unit source latent (eval, no grad)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = SwapperLike(base_ch)
    latent = torch.randn(LATENT_DIM, generator=generator)
    bound = BoundLatent(net, latent / latent.norm())
    bound = bound.to(device=device, dtype=dtype).eval()
    for p in bound.parameters():
        p.requires_grad_(False)
    return bound
