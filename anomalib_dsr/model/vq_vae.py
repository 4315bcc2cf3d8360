"""General VQ-VAE of DSR (docs/method.md#modules): two-level encoder, two EMA codebooks, general decoder.

Trained once ("phase 1", ``anomalib_dsr.workflows.pretrain_vq``) and frozen afterwards. Inputs here are already in
the VQ-VAE's channel order (BGR, docs/method.md#input); the callers flip RGB images.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_dsr.model.layers.graph_capture import capturing_graph


class ResidualBlock(nn.Module):
    """``relu(x) + conv1x1(relu(conv3x3(relu(x))))`` (no biases). Shape preserving.

    The skip adds ReLU(x), not x: the released code's first ReLU is in place, so its skip connection sees the
    rectified tensor; the released weights were trained this way (docs/method.md#modules).
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        # Indices 1 and 3 hold the convolutions, as in the released files' ``_block.1`` and ``_block.3``.
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block[0](x)
        return x + self.block[1:](x)


class ResidualStack(nn.Module):
    """``num_layers`` residual blocks, then a ReLU. Shape preserving."""

    def __init__(self, channels: int, hidden: int, num_layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ResidualBlock(channels, hidden) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return F.relu(x, inplace=True)


class EncoderHi(nn.Module):
    """Image ``(B, 3, H, W)`` → features ``(B, C, H/4, W/4)``."""

    def __init__(self, channels: int, res_hidden: int) -> None:
        super().__init__()
        self.conv_1 = nn.Conv2d(3, channels // 2, 4, stride=2, padding=1)
        self.conv_2 = nn.Conv2d(channels // 2, channels, 4, stride=2, padding=1)
        self.conv_3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.residual_stack = ResidualStack(channels, res_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv_1(x), inplace=True)
        x = F.relu(self.conv_2(x), inplace=True)
        return self.residual_stack(self.conv_3(x))


class EncoderLo(nn.Module):
    """Hi features ``(B, C, H/4, W/4)`` → lo features ``(B, C, H/8, W/8)``."""

    def __init__(self, channels: int, res_hidden: int) -> None:
        super().__init__()
        self.conv_1 = nn.Conv2d(channels, channels, 4, stride=2, padding=1)
        self.conv_2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.residual_stack = ResidualStack(channels, res_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual_stack(self.conv_2(F.relu(self.conv_1(x), inplace=True)))


class ImageDecoder(nn.Module):
    """Features ``(B, in_channels, h, w)`` → image ``(B, 3, 4h, 4w)``; no output activation.

    D_gen is this decoder on 256 channels; D_spc ends with it on 64 channels (docs/method.md#modules).
    """

    def __init__(self, in_channels: int, channels: int, res_hidden: int) -> None:
        super().__init__()
        self.conv_1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.residual_stack = ResidualStack(channels, res_hidden)
        self.conv_trans_1 = nn.ConvTranspose2d(channels, channels // 2, 4, stride=2, padding=1)
        self.conv_trans_2 = nn.ConvTranspose2d(channels // 2, 3, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.residual_stack(self.conv_1(x))
        return self.conv_trans_2(F.relu(self.conv_trans_1(x), inplace=True))


class Quantized(NamedTuple):
    """Output of :class:`EMACodebook`. ``quantized`` carries the straight-through gradient."""

    quantized: torch.Tensor  # (B, D, h, w)
    indices: torch.Tensor  # (B, h, w) int64
    commitment_loss: torch.Tensor  # scalar
    perplexity: torch.Tensor  # scalar
    codes_used: torch.Tensor  # scalar: share of the codebook used in this batch


class EMACodebook(nn.Module):
    """Vector quantiser with a codebook learned by exponential moving average (docs/method.md#modules).

    Args:
        num_embeddings: codebook size K (paper: 4096).
        embedding_dim: code dimension D (paper: 128).
        commitment_cost: weight of the commitment loss (paper: 0.25).
        decay: EMA decay (paper: 0.99).
        epsilon: Laplace smoothing of the cluster sizes (paper: 1e-5).
        dead_code_threshold: in training, codes whose EMA cluster size falls below this are moved onto
            random input features (0 = off, as in the paper; see :meth:`restart_dead_codes`).
    """

    def __init__(
        self,
        num_embeddings: int = 4096,
        embedding_dim: int = 128,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        dead_code_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        self.dead_code_threshold = dead_code_threshold
        self.commitment_cost = commitment_cost
        self.decay = decay
        self.epsilon = epsilon
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.data.normal_()
        self.embedding.weight.requires_grad_(False)  # learned by EMA, not by the optimiser
        self.register_buffer("ema_cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("ema_w", self.embedding.weight.data.clone())

    @property
    def num_embeddings(self) -> int:
        return self.embedding.num_embeddings

    def squared_distances(self, flat: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` features → ``(N, K)`` squared L2 distances to every code, in fp32 (fp64 for fp64 features)."""
        with torch.autocast(flat.device.type, enabled=False):
            flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
            codes = self.embedding.weight.to(flat.dtype)
            # Exported, deploy/export.py rewrites this addmm's argmin (REWRITES["nearest code"]): keep them in step.
            return (flat.square().sum(1, keepdim=True) + codes.square().sum(1)).addmm_(flat, codes.t(), alpha=-2.0)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices ``(B, h, w)`` → code vectors ``(B, D, h, w)``."""
        return self.embedding.weight[indices].permute(0, 3, 1, 2)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index ``(B, h, w)`` of the nearest code (L2) to each feature of ``z`` ``(B, D, h, w)``.

        Eagerly the distances are computed for 2^22 pairs at a time (16 MiB in fp32): the same indices as from the whole
        matrix, which at batch 8 and 256x256 would take 512 MiB per quantisation. Their minimum's index comes from
        ``min(1)``, which returns argmin's first index of the minimum faster on CPU (docs/speed.md). Captured graphs
        (export) keep the whole matrix and argmin, whatever the batch.
        """
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if capturing_graph():
            return self.squared_distances(flat).argmin(1).view(b, h, w)
        rows = max(1, 2**22 // self.num_embeddings)
        return torch.cat([self.squared_distances(part).min(1).indices for part in flat.split(rows)]).view(b, h, w)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codes ``(B, D, h, w)`` with the straight-through gradient; no EMA update, no statistics."""
        quantized = self.lookup(self.nearest(z)).to(z.dtype)
        return z + (quantized - z).detach()  # exported: REWRITES["straight-through"] of deploy/export.py

    def forward(self, z: torch.Tensor) -> Quantized:
        """Quantise ``z`` ``(B, D, h, w)`` with loss and usage statistics; EMA-update the codebook when training."""
        indices = self.nearest(z)
        if self.training:
            self._ema_update(z.detach(), indices)
            if self.dead_code_threshold > 0:
                self.restart_dead_codes(z.detach(), self.dead_code_threshold)
        quantized = self.lookup(indices).to(z.dtype)
        commitment_loss = self.commitment_cost * F.mse_loss(z, quantized.detach())
        usage = torch.bincount(indices.flatten(), minlength=self.num_embeddings).float() / indices.numel()
        perplexity = torch.exp(-(usage * torch.log(usage + 1e-10)).sum())
        codes_used = (usage > 0).float().mean()
        return Quantized(z + (quantized - z).detach(), indices, commitment_loss, perplexity, codes_used)

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, threshold: float) -> None:
        """Move codes whose EMA cluster size is below ``threshold`` onto random features of ``z`` ``(B, D, h, w)``.

        Not in the paper (whose VQ training code was not released); pretraining uses it against codebook
        collapse, and at the first step it initialises every code from data.
        """
        dead = self.ema_cluster_size < threshold
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        picks = flat[torch.randint(flat.shape[0], (self.num_embeddings,), device=flat.device)]
        self.embedding.weight.copy_(torch.where(dead.unsqueeze(1), picks, self.embedding.weight))
        self.ema_w.copy_(torch.where(dead.unsqueeze(1), picks * threshold, self.ema_w))
        self.ema_cluster_size.copy_(
            torch.where(dead, torch.full_like(self.ema_cluster_size, threshold), self.ema_cluster_size)
        )

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        indices = indices.flatten()
        counts = torch.bincount(indices, minlength=self.num_embeddings).float()
        sums = torch.zeros_like(self.ema_w).index_add_(0, indices, flat)
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_w.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        self.embedding.weight.copy_(self.ema_w / smoothed.unsqueeze(1))


class Encoded(NamedTuple):
    """What :meth:`GeneralVQVAE.encode` computes; shapes for an input ``(B, 3, H, W)``."""

    features_hi: torch.Tensor  # encoder_hi output (B, C, H/4, W/4)
    z_lo: torch.Tensor  # pre-quantisation lo features (B, D, H/8, W/8)
    q_lo: torch.Tensor  # Q_lo (B, D, H/8, W/8)
    z_hi: torch.Tensor  # pre-quantisation hi features (B, D, H/4, W/4)
    q_hi: torch.Tensor  # Q_hi (B, D, H/4, W/4)
    up_lo: torch.Tensor  # up(Q_lo) (B, D, H/4, W/4): input of z_hi and of both image decoders


class GeneralVQVAE(nn.Module):
    """The general-appearance VQ-VAE (docs/method.md#modules). Paper widths are the defaults.

    Args:
        channels: encoder/decoder width (paper: 128).
        res_hidden: residual-block bottleneck width (paper: 64).
        num_embeddings: entries per codebook (paper: 4096).
        embedding_dim: code dimension (paper: 128).
        commitment_cost: paper: 0.25.
        decay: EMA decay of the codebooks (paper: 0.99).
        dead_code_threshold: dead-code restarts while training the codebooks (0 = off; see EMACodebook).
    """

    def __init__(
        self,
        channels: int = 128,
        res_hidden: int = 64,
        num_embeddings: int = 4096,
        embedding_dim: int = 128,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        dead_code_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder_hi = EncoderHi(channels, res_hidden)
        self.encoder_lo = EncoderLo(channels, res_hidden)
        self.pre_quant_lo = nn.Conv2d(channels, embedding_dim, 1)
        self.codebook_lo = EMACodebook(
            num_embeddings, embedding_dim, commitment_cost, decay, dead_code_threshold=dead_code_threshold
        )
        self.upsample_lo = nn.ConvTranspose2d(embedding_dim, embedding_dim, 4, stride=2, padding=1)
        self.pre_quant_hi = nn.Conv2d(embedding_dim + channels, embedding_dim, 1)
        self.codebook_hi = EMACodebook(
            num_embeddings, embedding_dim, commitment_cost, decay, dead_code_threshold=dead_code_threshold
        )
        self.decoder = ImageDecoder(2 * embedding_dim, channels, res_hidden)

    def hi_features(self, q_lo: torch.Tensor, features_hi: torch.Tensor) -> torch.Tensor:
        """z_hi ``(B, D, H/4, W/4)`` = 1x1 conv of [encoder_hi output, up(Q_lo)].

        The order matters for the released weights: their ``_pre_vq_conv_bot`` takes encoder_hi's output in
        its first input channels (the paper does not say, the released code does; docs/method.md#shapes).
        """
        return self.hi_features_from_up(self.upsample_lo(q_lo), features_hi)

    def hi_features_from_up(self, up_lo: torch.Tensor, features_hi: torch.Tensor) -> torch.Tensor:
        """:meth:`hi_features` from an already upsampled ``up(Q_lo)``."""
        return self.pre_quant_hi(torch.cat((features_hi, up_lo), dim=1))

    def encode(self, images: torch.Tensor) -> Encoded:
        """Images ``(B, 3, H, W)`` (BGR, sides multiples of 8) → both quantised levels, no statistics.

        Always in the weights' precision (float32), also under autocast: features rounded to bf16 (3 significant
        digits) move many of them to another code, and every later stage follows the codes.
        """
        with torch.autocast(images.device.type, enabled=False):
            return self._encode(images.to(self.pre_quant_lo.weight.dtype))

    def _encode(self, images: torch.Tensor) -> Encoded:
        features_hi = self.encoder_hi(images)
        z_lo = self.pre_quant_lo(self.encoder_lo(features_hi))
        q_lo = self.codebook_lo.quantize(z_lo)
        up_lo = self.upsample_lo(q_lo)
        z_hi = self.hi_features_from_up(up_lo, features_hi)
        return Encoded(features_hi, z_lo, q_lo, z_hi, self.codebook_hi.quantize(z_hi), up_lo)

    def join(self, q_lo: torch.Tensor, q_hi: torch.Tensor) -> torch.Tensor:
        """``[up(Q_lo), Q_hi]`` ``(B, 2D, H/4, W/4)``: the input of both image decoders."""
        return torch.cat((self.upsample_lo(q_lo), q_hi), dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Quantized, Quantized]:
        """Pretraining pass: reconstruction ``(B, 3, H, W)`` and both levels' quantiser outputs."""
        features_hi = self.encoder_hi(images)
        lo = self.codebook_lo(self.pre_quant_lo(self.encoder_lo(features_hi)))
        hi = self.codebook_hi(self.hi_features(lo.quantized, features_hi))
        return self.decoder(self.join(lo.quantized, hi.quantized)), lo, hi
