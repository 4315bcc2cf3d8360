"""Convolution blocks of the U-Nets, D_spc and the restriction modules, and their weight initialisation."""

from __future__ import annotations

from torch import nn

from anomalib_dsr.model.layers.norm import InstanceNorm2d
from anomalib_dsr.model.layers.sampling import Upsample2x
from anomalib_dsr.model.layers.timed_conv import TimedConv3x3


def conv3x3(in_channels: int, out_channels: int, *, timed: bool) -> nn.Conv2d:
    """Convolution 3x3 with padding 1; a :class:`TimedConv3x3` if ``timed`` (inference times its algorithms: for
    modules after the last code choice only)."""
    return TimedConv3x3(in_channels, out_channels) if timed else nn.Conv2d(in_channels, out_channels, 3, padding=1)


def double_conv(in_channels: int, mid_channels: int, out_channels: int, *, timed: bool) -> nn.Sequential:
    """[conv 3x3, InstanceNorm, ReLU] x2; shape ``(B, in, h, w)`` → ``(B, out, h, w)``."""
    return nn.Sequential(
        conv3x3(in_channels, mid_channels, timed=timed),
        InstanceNorm2d(mid_channels, inplace=True),
        nn.ReLU(inplace=True),  # in place: the norm's backward needs its input, not its output
        conv3x3(mid_channels, out_channels, timed=timed),
        InstanceNorm2d(out_channels, inplace=True),
        nn.ReLU(inplace=True),
    )


def up_conv(in_channels: int, out_channels: int, *, timed: bool) -> nn.Sequential:
    """Bilinear x2 (align_corners), conv 3x3, InstanceNorm, ReLU; ``(B, in, h, w)`` → ``(B, out, 2h, 2w)``; if
    ``timed``, the convolution is a :class:`TimedConv3x3` and the upsampling an :class:`Upsample2x`."""
    return nn.Sequential(
        # exported, nn.Upsample is an Interpolate-11 that deploy/export.py rewrites (REWRITES["Interpolate-11"])
        Upsample2x() if timed else nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        conv3x3(in_channels, out_channels, timed=timed),
        InstanceNorm2d(out_channels, inplace=True),
        nn.ReLU(inplace=True),
    )


def init_normal_(module: nn.Module, std: float = 0.02) -> None:
    """Draw every conv and transposed-conv weight from N(0, std) (paper: 0.02)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(layer.weight, 0.0, std)
