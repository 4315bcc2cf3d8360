"""Object-specific appearance decoder D_spc (docs/method.md#modules)."""

from __future__ import annotations

import torch
from torch import nn

from anomalib_dsr.model.layers import MaxPool2x2, double_conv, init_normal_, run_fastest
from anomalib_dsr.model.vq_vae import ImageDecoder


class ObjectSpecificDecoder(nn.Module):
    """Joined restricted features ``(B, in_channels, H/4, W/4)`` → image ``(B, 3, H, W)``.

    Args:
        in_channels: channels of [up(Q̃_lo), Q̃_hi] (paper: 256).
        bottleneck: width of the 1x1 bottleneck (paper: 64).
        channels: width of the D_gen-style tail (paper: 128).
        res_hidden: residual-block bottleneck width of the tail (paper: 64).
    """

    def __init__(self, in_channels: int = 256, bottleneck: int = 64, channels: int = 128, res_hidden: int = 64) -> None:
        super().__init__()
        self.block1 = double_conv(in_channels, in_channels, 2 * in_channels, timed=True)
        self.block2 = double_conv(2 * in_channels, 2 * in_channels, 4 * in_channels, timed=True)
        self.pool = MaxPool2x2()
        self.bottleneck = nn.Conv2d(4 * in_channels, bottleneck, 1)
        self.upblock1 = nn.ConvTranspose2d(bottleneck, bottleneck, 4, stride=2, padding=1)
        self.upblock2 = nn.ConvTranspose2d(bottleneck, bottleneck, 4, stride=2, padding=1)
        self.decoder = ImageDecoder(bottleneck, channels, res_hidden)
        init_normal_(self)  # docs/method.md#modules: N(0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_fastest(self, x, lambda x: self.pool(self.block2(self.pool(self.block1(x)))))
        x = torch.relu_(self.upblock1(self.bottleneck(x)))
        x = torch.relu_(self.upblock2(x))
        return self.decoder(x)
