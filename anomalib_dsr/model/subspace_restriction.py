"""Subspace restriction module (docs/method.md#modules): maps quantised features towards the normal subspace."""

from __future__ import annotations

import torch
from torch import nn

from anomalib_dsr.model.layers import MaxPool2x2, double_conv, up_conv


class RestrictionEncoder(nn.Module):
    """Widths ``(c, 2c, 4c)`` with two max-pools: ``(B, c, h, w)`` → ``(B, 4c, h/4, w/4)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block1 = double_conv(channels, channels, channels, timed=False)
        self.block2 = double_conv(channels, 2 * channels, 2 * channels, timed=False)
        self.block3 = double_conv(2 * channels, 4 * channels, 4 * channels, timed=False)
        self.pool = MaxPool2x2()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block3(self.pool(self.block2(self.pool(self.block1(x)))))


class RestrictionDecoder(nn.Module):
    """``(B, 4c, h/4, w/4)`` → ``(B, c, h, w)``; no skip connections, linear final conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.up2 = up_conv(4 * channels, 2 * channels, timed=False)
        self.db2 = double_conv(2 * channels, 2 * channels, 2 * channels, timed=False)
        self.up3 = up_conv(2 * channels, channels, timed=False)
        self.db3 = double_conv(channels, channels, channels, timed=False)
        self.fin_out = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fin_out(self.db3(self.up3(self.db2(self.up2(x)))))


class SubspaceRestriction(nn.Module):
    """Quantised features ``(B, D, h, w)`` → restricted features F̃ ``(B, D, h, w)`` (before re-quantisation).

    Args:
        embedding_dim: code dimension D (paper: 128); h and w must be multiples of 4.
    """

    def __init__(self, embedding_dim: int = 128) -> None:
        super().__init__()
        self.encoder = RestrictionEncoder(embedding_dim)
        self.decoder = RestrictionDecoder(embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))
