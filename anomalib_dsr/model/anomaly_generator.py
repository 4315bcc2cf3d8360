"""Simulated anomalies for DSR training: phase 2 (docs/method.md#simulated-anomalies), phase 3 (docs/method.md#phase-3).

All randomness comes from torch's global RNG on the batch's device, so ``seed_everything`` makes a
run reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from anomalib.data.utils.generators import generate_perlin_noise

from anomalib_dsr.model.vq_vae import EMACodebook


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image ``(B, C, H, W)`` about its centre by its own angle ``(B,)``, black fill.

    Never under autocast: ``affine_grid`` is a matrix product, and a bf16 grid moves the sampling points of a
    rotated image by up to half a pixel (rotated images then differed from fp32's by up to 0.2).
    """
    with torch.autocast(images.device.type, enabled=False):
        theta = torch.deg2rad(degrees.float())
        cos, sin, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
        affine = torch.stack((torch.stack((cos, -sin, zero), 1), torch.stack((sin, cos, zero), 1)), 1)
        grid = F.affine_grid(affine.to(images.dtype), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_rotate(images: torch.Tensor, probability: float, max_degrees: float = 90.0) -> torch.Tensor:
    """With ``probability`` per image, rotate it by an angle ~ U(-max_degrees, max_degrees)."""
    b = images.shape[0]
    angles = (torch.rand(b, device=images.device) * 2 - 1) * max_degrees
    angles = angles * (torch.rand(b, device=images.device) < probability)
    return rotate(images, angles)


def perlin_noise(height: int, width: int, device: torch.device) -> torch.Tensor:
    """anomalib's ``generate_perlin_noise`` ``(H, W)`` with 2^a x 2^b periods, a, b ~ U{0..5}.

    The periods are drawn from the CPU generator, in the order anomalib draws them: the same noise on CPU,
    and on an accelerator no ``.item()`` that would make the step wait for the device.
    """
    scale = tuple(2 ** int(torch.randint(0, 6, (1,))) for _ in range(2))
    return generate_perlin_noise(height, width, scale=scale, device=device)


def perlin_masks(
    batch_size: int,
    height: int,
    width: int,
    device: torch.device,
    normal_probability: float = 0.5,
) -> torch.Tensor:
    """Binary Perlin masks ``(B, 1, H, W)`` (docs/method.md#simulated-anomalies).

    Noise with 2^a x 2^b periods (a, b ~ U{0..5}, anomalib's ``generate_perlin_noise``), rotated by
    U(-90°, 90°), thresholded at > 0.5; each mask is emptied with ``normal_probability`` (paper: 0.5).
    """
    noise = torch.stack([perlin_noise(height, width, device) for _ in range(batch_size)])
    noise = random_rotate(noise.unsqueeze(1), probability=1.0)
    keep = torch.rand(batch_size, 1, 1, 1, device=device) >= normal_probability
    return ((noise > 0.5) & keep).float()


def blocky(mask: torch.Tensor, cell: int) -> torch.Tensor:
    """Max-pool a mask ``(B, 1, H, W)`` to ``cell x cell`` blocks: ``(B, 1, H/cell, W/cell)``."""
    return F.max_pool2d(mask, cell)


class LatentAnomalyGenerator:
    """Replaces quantised features inside a mask by distant codebook entries (docs/method.md#simulated-anomalies).

    Args:
        strength: lower bound of λ ~ U[strength, 1) (paper: 0.2, ``latent_anomaly_strength``).
        nearest_excluded: share of the nearest codes never used as replacement (paper: 0.05).
        both_probability: probability that both levels get anomalies (paper: 0.5); the rest is
            split evenly between lo only and hi only.
    """

    def __init__(self, strength: float = 0.2, nearest_excluded: float = 0.05, both_probability: float = 0.5) -> None:
        if not 0.0 < strength < 1.0:
            msg = f"latent_anomaly_strength must lie in (0, 1), got {strength}."
            raise ValueError(msg)
        self.strength = strength
        self.nearest_excluded = nearest_excluded
        self.both_probability = both_probability

    def sample_levels(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, whether lo and hi get anomalies: both (p=0.5), lo only (0.25), hi only (0.25)."""
        u = torch.rand(batch_size, device=device)
        lo_only_edge = self.both_probability + (1 - self.both_probability) / 2
        return u < lo_only_edge, (u < self.both_probability) | (u >= lo_only_edge)

    def rank_window(self, strength: torch.Tensor, num_embeddings: int) -> tuple[int, torch.Tensor]:
        """Ranks ``[low, high)`` from which a replacement is drawn, for per-image strengths λ ``(B,)``."""
        low = int(self.nearest_excluded * num_embeddings)
        high = torch.clamp(torch.floor(strength * num_embeddings).long() + 1, max=num_embeddings - 1)
        return low, high

    @torch.no_grad()
    def replace(self, codebook: EMACodebook, z: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Quantised features ``q`` ``(B, D, h, w)`` with codes replaced where ``mask`` ``(B, 1, h, w)`` is set.

        Only masked positions are ranked: their pre-quantisation features ``z`` are compared with every
        code, and each takes the code at a uniformly drawn rank of its image's window.
        """
        b_idx, y_idx, x_idx = mask[:, 0].nonzero(as_tuple=True)
        if b_idx.numel() == 0:
            return q
        k = codebook.num_embeddings
        strength = self.strength + (1 - self.strength) * torch.rand(q.shape[0], device=q.device)
        low, high = self.rank_window(strength, k)
        high = high[b_idx]
        rank = low + (torch.rand(b_idx.shape, device=q.device) * (high - low)).long().clamp(max=high - 1 - low)
        order = codebook.squared_distances(z[b_idx, :, y_idx, x_idx]).argsort(dim=1)
        codes = order.gather(1, rank.unsqueeze(1)).squeeze(1)
        out = q.clone()
        out[b_idx, :, y_idx, x_idx] = codebook.embedding.weight[codes].to(q.dtype)
        return out


class ImageAnomalyGenerator:
    """Phase-3 anomalies in image space (docs/method.md#phase-3).

    Inside a Perlin mask, pixel = (1 − β)·c + β·x with one random colour c per image and
    β ~ U[0, max_beta) (paper: 0.8); the base image is first rotated ±90° with ``rotation_probability``
    (paper: 0.3); masks are empty with ``normal_probability`` (paper: 0.5).
    """

    def __init__(
        self, max_beta: float = 0.8, rotation_probability: float = 0.3, normal_probability: float = 0.5
    ) -> None:
        self.max_beta = max_beta
        self.rotation_probability = rotation_probability
        self.normal_probability = normal_probability

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, 3, H, W)`` in [0, 1] → (augmented images, masks ``(B, 1, H, W)``)."""
        b, _, h, w = images.shape
        images = random_rotate(images, self.rotation_probability)
        masks = perlin_masks(b, h, w, images.device, self.normal_probability).to(images.dtype)
        colour = torch.rand(b, 3, 1, 1, device=images.device, dtype=images.dtype)
        beta = self.max_beta * torch.rand(b, 1, 1, 1, device=images.device, dtype=images.dtype)
        blended = (1 - beta) * colour + beta * images
        return masks * blended + (1 - masks) * images, masks
