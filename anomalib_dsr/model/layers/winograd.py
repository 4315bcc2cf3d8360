"""Winograd convolution F(4x4, 3x3) as matrix products: the U-Nets' and D_spc's 3x3 convolutions at inference.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016), interpolation points 0, ±1, ±2, ∞.
Each 4x4 output tile is ``Aᵀ [(G w Gᵀ) ⊙ (Bᵀ d B)] A`` of its 6x6 input tile ``d``: 36 products per tile and channel
pair instead of direct convolution's 144. Written as one transform of the input tiles, 36 matrix products over
channels and one transform back, all of them BLAS matrix products, so they run at the speed of the CPU's matrix
products (AVX-512 where it has them), unlike NNPACK's AVX2 Winograd kernels. Its float32 error is about 1e-5 of
the output's scale, like NNPACK's (oneDNN's direct convolution: 3e-7).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_BT = torch.tensor(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=torch.float64,
)
_G = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=torch.float64,
)
_AT = torch.tensor(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=torch.float64
)
# The 2-D transforms of a flattened tile: Bᵀ d B = (Bᵀ ⊗ Bᵀ) vec(d), G w Gᵀ = (G ⊗ G) vec(w), Aᵀ m A = (Aᵀ ⊗ Aᵀ) vec(m).
_INPUT_TRANSFORM = torch.kron(_BT, _BT).float()  # (36, 36)
_WEIGHT_TRANSFORM = torch.kron(_G, _G).float()  # (36, 9)
_OUTPUT_TRANSFORM = torch.kron(_AT, _AT).float()  # (16, 36)


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """3x3 filters ``(K, C, 3, 3)`` → ``(36, K, C)``: ``G w Gᵀ`` per filter."""
    filters, channels = weight.shape[:2]
    return (_WEIGHT_TRANSFORM @ weight.reshape(filters * channels, 9).t()).view(36, filters, channels)


def supported(x: torch.Tensor) -> bool:
    """Whether :func:`winograd_conv3x3` takes ``x`` ``(B, C, H, W)``: float32, H and W multiples of 4."""
    return x.dtype == torch.float32 and x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0


def winograd_conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, block_bytes: int = 2**24
) -> torch.Tensor:
    """3x3 convolution, stride 1, padding 1: ``(B, C, H, W)`` float32, H and W multiples of 4 → ``(B, K, H, W)``.

    ``weight`` ``(K, C, 3, 3)`` is transformed on every call: a cached copy would take 4x the weights' memory and miss
    writes that do not count as changes of the parameter (fused Adam's, ``.data``'s). The work is split so that no
    buffer exceeds ``block_bytes``: groups of filters' transformed weights, and blocks of whole rows of tiles of each
    image. Much larger buffers get fresh pages from the system on every call (glibc's mmap threshold is at most 32 MiB)
    and fall out of the CPU's cache; much smaller ones make small, slow matrix products. 16 MiB did best among 2 to
    32 MiB in the model's own timings (docs/speed.md).
    """
    batch, channels, height, width = x.shape
    filters = weight.shape[0]
    floats = block_bytes // 4
    group = math.ceil(filters / math.ceil(36 * filters * channels / floats))  # filters per group of weights
    weights = [transform_weight(part) for part in weight.split(group)]
    tile_cols = width // 4
    rows = max(1, floats // (36 * max(channels, group) * tile_cols))  # tile rows per block
    padded = F.pad(x, (1, 1, 1, 1))
    s_b, s_c, s_h, s_w = padded.stride()
    out = torch.empty(batch, filters, height, width, dtype=x.dtype, device=x.device)
    for b in range(batch):
        for top in range(0, height // 4, rows):
            n = min(rows, height // 4 - top)
            offset = padded.storage_offset() + b * s_b + 4 * top * s_h
            # Overlapping 6x6 input tiles, stride 4, gathered channel by channel (each channel's rows are read while
            # in cache; 2-3x faster than gathering each of the 36 tile entries across all channels):
            # (C, 6, 6, n, tile_cols) → (C, 36, n * tile_cols), transformed per channel, used as (36, C, n * tile_cols).
            tiles = padded.as_strided((channels, 6, 6, n, tile_cols), (s_c, s_h, s_w, 4 * s_h, 4 * s_w), offset)
            transformed = torch.matmul(_INPUT_TRANSFORM, tiles.reshape(channels, 36, -1)).transpose(0, 1)
            for index, part in enumerate(weights):
                size = part.shape[1]
                products = torch.bmm(part, transformed).view(36, -1)  # (36, size * n * tile_cols)
                block = (_OUTPUT_TRANSFORM @ products).view(4, 4, size, n, tile_cols)
                target = out[b, index * group : index * group + size, 4 * top : 4 * (top + n)]
                target.view(size, n, 4, tile_cols, 4).copy_(block.permute(2, 3, 0, 4, 1))
    return out if bias is None else out.add_(bias.view(1, -1, 1, 1))
