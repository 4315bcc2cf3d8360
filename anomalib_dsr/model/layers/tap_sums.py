"""A 3x3 convolution with few filters as one matrix product and nine shifted sums: the U-Nets' last layer (64 → 2
channels) at inference.

With 2 filters oneDNN's direct convolution runs far below the CPU's matrix-product speed; all nine taps' channel
sums, ``(9K, C) @ (C, H*W)``, are one matrix product, and adding the nine ``(K, H, W)`` results at their offsets
reads only 9K/C of the input's size again (timings: docs/speed.md).
"""

from __future__ import annotations

import torch


def tap_sum_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """3x3 convolution, stride 1, padding 1: ``(B, C, H, W)`` → ``(B, K, H, W)`` for ``weight`` ``(K, C, 3, 3)``.

    Output pixel ``p`` is the sum over taps ``(i, j)`` of ``W[:, :, i, j] @ x[:, p + (i - 1, j - 1)]``; taps that fall
    outside the map are the zero padding and add nothing.
    """
    batch, channels, height, width = x.shape
    filters = weight.shape[0]
    per_tap = weight.permute(2, 3, 0, 1).reshape(9 * filters, channels)
    taps = torch.matmul(per_tap, x.flatten(2)).view(batch, 3, 3, filters, height, width)
    out = taps[:, 1, 1].clone() if bias is None else taps[:, 1, 1] + bias.view(1, -1, 1, 1)
    for i in range(3):
        for j in range(3):
            if i == j == 1:
                continue
            # Output rows/columns whose tap (i, j) lies inside the map, and those input rows/columns.
            rows_out = slice(max(0, 1 - i), height - max(0, i - 1))
            rows_in = slice(max(0, i - 1), height - max(0, 1 - i))
            cols_out = slice(max(0, 1 - j), width - max(0, j - 1))
            cols_in = slice(max(0, j - 1), width - max(0, 1 - j))
            out[:, :, rows_out, cols_out] += taps[:, i, j, :, rows_in, cols_in]
    return out
