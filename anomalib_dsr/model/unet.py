"""U-Net of the anomaly detection and upsampling modules (docs/method.md)."""

from __future__ import annotations

import torch
from torch import nn

from anomalib_dsr.model.layers.autotune import run_fastest
from anomalib_dsr.model.layers.blocks import conv3x3, double_conv, up_conv
from anomalib_dsr.model.layers.sampling import MaxPool2x2


class UNetEncoder(nn.Module):
    """Widths ``(w, 2w, 4w, 4w)`` with three max-pools; returns the four feature maps."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.block1 = double_conv(in_channels, width, width, timed=True)
        self.block2 = double_conv(width, 2 * width, 2 * width, timed=True)
        self.block3 = double_conv(2 * width, 4 * width, 4 * width, timed=True)
        self.block4 = double_conv(4 * width, 4 * width, 4 * width, timed=True)
        self.pool = MaxPool2x2()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b1 = self.block1(x)
        b2 = self.block2(self.pool(b1))
        b3 = self.block3(self.pool(b2))
        return b1, b2, b3, self.block4(self.pool(b3))


class UNetDecoder(nn.Module):
    """Upsample, concatenate the skip, two convs per level; final conv 3x3 to ``out_channels`` logits."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.up1 = up_conv(4 * width, 4 * width, timed=True)
        self.db1 = double_conv(8 * width, 4 * width, 4 * width, timed=True)
        self.up2 = up_conv(4 * width, 2 * width, timed=True)
        self.db2 = double_conv(4 * width, 2 * width, 2 * width, timed=True)
        self.up3 = up_conv(2 * width, width, timed=True)
        self.db3 = double_conv(2 * width, width, width, timed=True)
        self.fin_out = nn.Sequential(conv3x3(width, out_channels, timed=True))

    def forward(self, b1: torch.Tensor, b2: torch.Tensor, b3: torch.Tensor, b4: torch.Tensor) -> torch.Tensor:
        x = self.db1(torch.cat((self.up1(b4), b3), dim=1))
        x = self.db2(torch.cat((self.up2(x), b2), dim=1))
        x = self.db3(torch.cat((self.up3(x), b1), dim=1))
        return self.fin_out(x)


class UNet(nn.Module):
    """``(B, in_channels, H, W)`` → 2-class logits ``(B, 2, H, W)``; H and W multiples of 8.

    The anomaly detection module is ``UNet(6)`` on concat(I_spc, I_gen); the upsampling module is
    ``UNet(8)`` on concat(I_spc, I_gen, softmax(M_lo)). Base width 64 is the paper's.
    """

    def __init__(self, in_channels: int, width: int = 64, out_channels: int = 2) -> None:
        super().__init__()
        self.encoder = UNetEncoder(in_channels, width)
        self.decoder = UNetDecoder(width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_fastest(self, x, lambda x: self.decoder(*self.encoder(x)))
