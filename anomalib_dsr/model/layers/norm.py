"""Instance normalisation of the U-Nets, D_spc and the restriction modules, centred first for float32 accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_dsr.model.layers.graph_capture import capturing_graph


class InstanceNorm2d(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` (no affine, no running statistics), computed stably and fast: ``(B, C, H, W)`` → same.

    The same normalisation (per image and channel over ``H x W``, biased variance, the same eps), applied to the
    input minus its per-channel mean. That leaves the result unchanged, but float32 kernels cancel on a channel of
    large mean and small spread (E[x²] − E[x]², ``x * scale + shift``). On 8x128x32x32 channels of mean 100 and std
    1e-3 the largest error against float64 is 1e-7 this way, 2e-3 for ``nn.InstanceNorm2d``, 4e-3 for plain
    ``group_norm`` and 1.3 for ``group_norm`` on a channels_last tensor.

    - NCHW input (training): ``group_norm`` with one channel per group; on CPU faster than ``instance_norm``,
      forward and backward (docs/speed.md).
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
        if capturing_graph():
            # deploy/export.py rewrites this subtraction (REWRITES["centred normalisation"]): keep them in step.
            return super().forward(x - x.mean(dim=(2, 3), keepdim=True))
        if self.training or torch.is_grad_enabled():
            return self._normalise(x)
        # At inference a bf16 input (autocast) is normalised in bf16 by group_norm, which accumulates in fp32: autocast
        # would run it in fp32, a copy of every activation there and back, and centring first buys nothing at bf16's
        # 3 significant digits (the mean of a bf16 channels_last map costs more than the normalisation). Training
        # (also phase 3's pass through the frozen phase-2 modules) keeps autocast's choices.
        with torch.autocast(x.device.type, enabled=False):
            if x.dtype == torch.bfloat16:
                return F.group_norm(x, x.shape[1], eps=self.eps)
            return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # No gradient through the mean: the output does not depend on it.
        mean = x.mean(dim=(2, 3), keepdim=True).detach()
        centred = x.sub_(mean) if self.inplace else x - mean
        if centred.is_contiguous():
            return F.group_norm(centred, x.shape[1], eps=self.eps)
        residual = centred.mean(dim=(2, 3), keepdim=True)
        variance = (centred * centred).mean(dim=(2, 3), keepdim=True) - residual * residual
        rstd = (variance + self.eps).rsqrt()
        return torch.addcmul(-residual * rstd, centred, rstd)
