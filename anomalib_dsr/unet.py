"""U-Net of the anomaly detection and upsampling modules (SPEC §2), and its conv blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _capturing_graph() -> bool:
    """Whether the model is being traced or exported (ONNX, torch.export, torch.compile, TorchScript)."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


class InstanceNorm2d(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` (no affine, no running statistics), computed stably and fast: ``(B, C, H, W)`` → same.

    The same normalisation (per image and channel over ``H x W``, biased variance, the same eps), applied to the
    input minus its per-channel mean. That leaves the result unchanged, but float32 kernels cancel on a channel of
    large mean and small spread (E[x²] − E[x]², ``x * scale + shift``). On 8x128x32x32 channels of mean 100 and std
    1e-3 the largest error against float64 is 1e-7 this way, 2e-3 for ``nn.InstanceNorm2d``, 4e-3 for plain
    ``group_norm`` and 1.3 for ``group_norm`` on a channels_last tensor.

    - NCHW input (training): ``group_norm`` with one channel per group; on CPU a full-resolution U-Net block
      (8x64x256x256) runs 11–14 % faster than with ``instance_norm``, forward and backward.
    - channels_last input (inference): the centred channels' residual mean and second moment, then one
      ``addcmul``. ``group_norm``'s channels_last kernel loses up to 4e-5 even on centred 256x256 channels, and an
      NCHW copy costs more than oneDNN's channels_last convolutions save.
    - Graph capture (ONNX/OpenVINO export, ``torch.export``, ``torch.compile``): the mean, a subtraction and
      ``instance_norm``; exported graphs are centred too, and OpenVINO's normalisation has the same weakness.

    Args:
        num_features: channels C.
        inplace: subtract the mean in the input tensor itself, which saves allocating a copy (on CPU about as
            costly as the normalisation); only for inputs nothing else reads, like a convolution's output.
    """

    def __init__(self, num_features: int, *, inplace: bool = False) -> None:
        super().__init__(num_features)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _capturing_graph():
            return super().forward(x - x.mean(dim=(2, 3), keepdim=True))
        # No gradient through the mean: the output does not depend on it.
        mean = x.mean(dim=(2, 3), keepdim=True).detach()
        centred = x.sub_(mean) if self.inplace else x - mean
        if centred.is_contiguous():
            return F.group_norm(centred, x.shape[1], eps=self.eps)
        residual = centred.mean(dim=(2, 3), keepdim=True)
        variance = (centred * centred).mean(dim=(2, 3), keepdim=True) - residual * residual
        rstd = (variance + self.eps).rsqrt()
        return torch.addcmul(-residual * rstd, centred, rstd)


def double_conv(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """[conv 3x3, InstanceNorm, ReLU] x2; shape ``(B, in, h, w)`` → ``(B, out, h, w)``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 3, padding=1),
        InstanceNorm2d(mid_channels, inplace=True),
        nn.ReLU(inplace=True),  # in place: the norm's backward needs its input, not its output
        nn.Conv2d(mid_channels, out_channels, 3, padding=1),
        InstanceNorm2d(out_channels, inplace=True),
        nn.ReLU(inplace=True),
    )


def up_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Bilinear x2 (align_corners), conv 3x3, InstanceNorm, ReLU; ``(B, in, h, w)`` → ``(B, out, 2h, 2w)``."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        InstanceNorm2d(out_channels, inplace=True),
        nn.ReLU(inplace=True),
    )


def init_normal_(module: nn.Module, std: float = 0.02) -> None:
    """Draw every conv and transposed-conv weight from N(0, std) (paper: 0.02, SPEC §2)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(layer.weight, 0.0, std)


class UNetEncoder(nn.Module):
    """Widths ``(w, 2w, 4w, 4w)`` with three max-pools; returns the four feature maps."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.block1 = double_conv(in_channels, width, width)
        self.block2 = double_conv(width, 2 * width, 2 * width)
        self.block3 = double_conv(2 * width, 4 * width, 4 * width)
        self.block4 = double_conv(4 * width, 4 * width, 4 * width)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b1 = self.block1(x)
        b2 = self.block2(self.pool(b1))
        b3 = self.block3(self.pool(b2))
        return b1, b2, b3, self.block4(self.pool(b3))


class UNetDecoder(nn.Module):
    """Upsample, concatenate the skip, two convs per level; final conv 3x3 to ``out_channels`` logits."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.up1 = up_conv(4 * width, 4 * width)
        self.db1 = double_conv(8 * width, 4 * width, 4 * width)
        self.up2 = up_conv(4 * width, 2 * width)
        self.db2 = double_conv(4 * width, 2 * width, 2 * width)
        self.up3 = up_conv(2 * width, width)
        self.db3 = double_conv(2 * width, width, width)
        self.fin_out = nn.Sequential(nn.Conv2d(width, out_channels, 3, padding=1))

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
        return self.decoder(*self.encoder(x))
