"""Down- and upsampling by 2 of the U-Nets, D_spc and the restriction modules, with fast CPU inference paths."""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from anomalib_dsr.model.layers import autotune
from anomalib_dsr.model.layers.graph_capture import capturing_graph


class MaxPool2x2(nn.MaxPool2d):
    """Max-pool 2x2, stride 2: ``(B, C, h, w)`` → ``(B, C, h/2, w/2)``, h and w even. Without autograd on CPU (no graph
    capture) the maximum of the row pairs, then of the column pairs: the same values, several times faster than
    ``max_pool2d``'s CPU kernel at batch 1, which also writes the argmax indices (docs/speed.md). Training keeps
    ``nn.MaxPool2d``'s gradient, which goes to one element of a tied window; odd sides get its flooring.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu" or capturing_graph() or x.shape[-1] % 2 or x.shape[-2] % 2:
            return super().forward(x)  # exported: REWRITES["MaxPool-8"] of deploy/export.py
        rows = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


class Upsample2x(nn.Upsample):
    """Bilinear x2 upsampling with aligned corners: ``(B, C, h, w)`` → ``(B, C, 2h, 2w)``. At inference on CPU
    (:func:`~anomalib_dsr.model.layers.autotune.timed_inference`) either torch's kernel or two matrix products with
    the interpolation matrices ``(2w, w)`` and ``(2h, h)``, whichever
    :func:`~anomalib_dsr.model.layers.autotune.fastest_algorithm` measures faster: torch's kernel is slow on small maps,
    the products' work per pixel grows with the side (docs/speed.md). The products' weights come from float64, so they
    are nearer to exact (5e-7 of the scale) than torch's kernel, whose float32 source coordinates err by up to 3e-5.
    """

    def __init__(self) -> None:
        super().__init__(scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not autotune.timed_inference(self, x):
            return super().forward(x)
        algorithms = {"torch": super().forward, "matrix products": _upsample2x_by_matmul}
        return algorithms[autotune.fastest_algorithm(self, x, algorithms)](x)


@cache
def _interpolation_matrix(side: int) -> torch.Tensor:
    """``(2 side, side)`` float32: row ``i`` holds the weights of bilinear x2 upsampling with aligned corners, output
    ``i`` at source coordinate ``i (side - 1) / (2 side - 1)``, computed in float64."""
    source = torch.arange(2 * side, dtype=torch.float64) * (side - 1) / (2 * side - 1)
    below = source.floor().long()
    above = (below + 1).clamp(max=side - 1)
    fraction = source - below
    matrix = torch.zeros(2 * side, side, dtype=torch.float64)
    rows = torch.arange(2 * side)
    matrix.index_put_((rows, below), 1 - fraction, accumulate=True)
    matrix.index_put_((rows, above), fraction, accumulate=True)
    return matrix.float()


def _upsample2x_by_matmul(x: torch.Tensor) -> torch.Tensor:
    """:class:`Upsample2x` as ``M_h x M_wᵀ`` per channel: ``(B, C, h, w)`` float32 → ``(B, C, 2h, 2w)``."""
    batch, channels, height, width = x.shape
    rows = x.reshape(-1, width) @ _interpolation_matrix(width).t()  # (B * C * h, 2w)
    upsampled = _interpolation_matrix(height) @ rows.view(-1, height, 2 * width)  # (B * C, 2h, 2w)
    return upsampled.view(batch, channels, 2 * height, 2 * width)
