"""Simulated anomalies: Perlin masks, latent code replacement, image-space anomalies.

The recipes: docs/method.md#simulated-anomalies (phase 2) and docs/method.md#phase-3 (phase 3).

Statistical checks draw thousands of samples and use tolerances of at least 4 standard deviations, so
they do not depend on the seed; the seed only makes a failure reproducible.
"""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_dsr.model.anomaly_generator import ImageAnomalyGenerator, LatentAnomalyGenerator, perlin_masks
from anomalib_dsr.model.vq_vae import EMACodebook

CPU = torch.device("cpu")


def empty_share(masks: torch.Tensor) -> float:
    return (masks.flatten(1).amax(1) == 0).float().mean().item()


# --------------------------------------------------------------------------------------------- Perlin masks
def test_perlin_masks_shape_and_binary() -> None:
    torch.manual_seed(0)
    masks = perlin_masks(40, 64, 32, CPU)
    assert masks.shape == (40, 1, 64, 32)
    assert masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    # Some masks are non-empty and none covers the whole image.
    assert masks.flatten(1).amax(1).sum() > 0
    assert (masks.flatten(1).mean(1) < 1).all()


def test_masks_and_rotations_do_not_depend_on_autocast() -> None:
    """Under bf16-mixed training the generated masks and rotated images are fp32's (a bf16 rotation grid moved
    mask borders on 0.07 % of the pixels)."""
    images = torch.rand(4, 3, 64, 64)
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            masks = perlin_masks(16, 128, 128, torch.device("cpu"))
            results.append((masks, *ImageAnomalyGenerator(rotation_probability=1.0)(images)))
    # exact by construction: no op here is on autocast's bf16 list (rotate() disables it around its grid), so both
    # runs are the same fp32 kernels on the same seeded draws; a bf16 grid would move pixels (what this catches)
    for fp32, bf16 in zip(*results, strict=True):
        assert bf16.dtype == torch.float32
        assert torch.equal(fp32, bf16)


def test_perlin_masks_are_emptied_with_probability_one_half() -> None:
    """Half of the masks are emptied on purpose; the rest are empty only when the noise never exceeds 0.5."""
    torch.manual_seed(0)
    n = 3000
    natural = empty_share(perlin_masks(n, 32, 32, CPU, normal_probability=0.0))
    share = empty_share(perlin_masks(n, 32, 32, CPU, normal_probability=0.5))
    assert natural < 0.3  # thresholded Perlin noise is usually non-empty
    expected = 0.5 + 0.5 * natural
    sd = math.sqrt(expected * (1 - expected) / n + 0.25 * natural * (1 - natural) / n)
    assert abs(share - expected) < max(5 * sd, 0.04), (share, expected)
    assert empty_share(perlin_masks(200, 32, 32, CPU, normal_probability=1.0)) == 1.0


# ----------------------------------------------------------------------------------------- level sampling
def test_sample_levels_both_lo_only_hi_only() -> None:
    torch.manual_seed(0)
    n = 200_000
    lo, hi = LatentAnomalyGenerator().sample_levels(n, CPU)
    assert lo.dtype == hi.dtype == torch.bool
    assert lo.shape == hi.shape == (n,)
    assert not (~lo & ~hi).any(), "every image gets anomalies on at least one level"
    sd = math.sqrt(0.25 / n)  # largest binomial sd, p = 0.5
    assert (lo & hi).float().mean().item() == pytest.approx(0.5, abs=8 * sd)
    assert (lo & ~hi).float().mean().item() == pytest.approx(0.25, abs=8 * sd)
    assert (~lo & hi).float().mean().item() == pytest.approx(0.25, abs=8 * sd)


def test_latent_strength_must_be_a_fraction() -> None:
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="latent_anomaly_strength"):
            LatentAnomalyGenerator(strength=bad)


@pytest.mark.parametrize("strength", [0.2, 0.5, 0.95, 0.9999])
def test_rank_window_formula(strength: float) -> None:
    """Ranks [floor(0.05 K), min(floor(λ K) + 1, K − 1)) for the paper's K = 4096."""
    k = 4096
    low, high = LatentAnomalyGenerator().rank_window(torch.tensor([strength]), k)
    assert low == math.floor(0.05 * k)
    assert high.item() == min(math.floor(strength * k) + 1, k - 1)


# ---------------------------------------------------------------------------------- latent replacement
K = 100
DIM = 4


def ranked_codebook(seed: int = 0) -> tuple[EMACodebook, torch.Tensor]:
    """A codebook whose distance ranking from the origin is known, with code indices shuffled.

    The code of rank r lies at (r + 1)·(−1)^r on the first axis, so seen from the origin the ranks
    follow |position|; seen from the nearest code (+1) the order differs, which catches ranking by
    distance to the quantised instead of the pre-quantisation feature. Returns the codebook and
    ``rank_of_index``.
    """
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(K, generator=generator)  # perm[rank] = index
    codebook = EMACodebook(K, DIM)
    weight = torch.zeros(K, DIM)
    ranks = torch.arange(K, dtype=torch.float32)
    weight[perm, 0] = (ranks + 1) * torch.where(torch.arange(K) % 2 == 0, 1.0, -1.0)
    codebook.embedding.weight.data.copy_(weight)
    rank_of_index = torch.empty(K, dtype=torch.long)
    rank_of_index[perm] = torch.arange(K)
    return codebook, rank_of_index


def replace_and_record(generator: LatentAnomalyGenerator, codebook: EMACodebook, z, q, mask):
    """Run ``replace`` and record the per-image strengths and rank windows it used."""
    seen = {}
    original = generator.rank_window

    def recording(strength, num_embeddings):
        low, high = original(strength, num_embeddings)
        seen.update(strength=strength.clone(), low=low, high=high.clone())
        return low, high

    generator.rank_window = recording
    try:
        out = generator.replace(codebook, z, q, mask)
    finally:
        del generator.rank_window
    return out, seen


def recover_ranks(codebook: EMACodebook, rank_of_index: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Rank of each replacement vector ``(N, D)``; every vector must be exactly one codebook entry."""
    matches = (vectors[:, None, :] == codebook.embedding.weight[None]).all(-1)
    assert (matches.sum(1) == 1).all(), "a replacement is not a codebook entry"
    return rank_of_index[matches.float().argmax(1)]


def test_replace_keeps_unmasked_positions_and_uses_the_rank_window() -> None:
    torch.manual_seed(0)
    codebook, rank_of_index = ranked_codebook()
    b, h, w = 256, 8, 8
    z = torch.zeros(b, DIM, h, w)
    z[:, 1:] = torch.randn(b, DIM - 1, h, w)  # orthogonal offsets do not change the ranking
    q = codebook.lookup(codebook.nearest(z))
    assert (rank_of_index[codebook.nearest(z)] == 0).all()
    mask = (torch.rand(b, 1, h, w) < 0.5).float()
    generator = LatentAnomalyGenerator(strength=0.2)

    out, seen = replace_and_record(generator, codebook, z, q, mask)

    inside = mask[:, 0].bool()
    assert out.shape == q.shape
    assert torch.equal(out.permute(0, 2, 3, 1)[~inside], q.permute(0, 2, 3, 1)[~inside])  # exact: copied
    assert not torch.equal(q, out)

    # λ ~ U[0.2, 1) per image, and the window follows it.
    strength = seen["strength"]
    assert strength.shape == (b,)
    assert (strength >= 0.2).all() and (strength < 1).all()
    assert strength.min() < 0.3 and strength.max() > 0.9
    expected_high = torch.clamp(torch.floor(strength * K).long() + 1, max=K - 1)
    assert torch.equal(seen["high"], expected_high)  # exact: integers from one correctly rounded product
    assert seen["low"] == math.floor(0.05 * K)

    b_idx, y_idx, x_idx = inside.nonzero(as_tuple=True)
    ranks = recover_ranks(codebook, rank_of_index, out[b_idx, :, y_idx, x_idx])
    assert (ranks >= math.floor(0.05 * K)).all(), "the nearest 5 % must never be used"
    assert (ranks < expected_high[b_idx]).all()
    assert ranks.min() == math.floor(0.05 * K)  # the window starts exactly at 5 %


def test_replacement_ranks_are_uniform_over_the_window() -> None:
    """With λ ≈ 1 the window is [5, 99) for K = 100; 8000+ draws cover it uniformly."""
    torch.manual_seed(1)
    codebook, rank_of_index = ranked_codebook(seed=1)
    b, h, w = 128, 8, 8
    z = torch.zeros(b, DIM, h, w)
    q = codebook.lookup(codebook.nearest(z))
    mask = torch.ones(b, 1, h, w)
    out = LatentAnomalyGenerator(strength=0.995).replace(codebook, z, q, mask)
    ranks = recover_ranks(codebook, rank_of_index, out.permute(0, 2, 3, 1).reshape(-1, DIM))
    low, high = math.floor(0.05 * K), K - 1
    assert ranks.min() == low and ranks.max() == high - 1
    counts = torch.bincount(ranks, minlength=K)[low:high].float()
    assert (counts > 0).all()
    n, m = ranks.numel(), high - low
    mean_sd = math.sqrt((m * m - 1) / 12 / n)
    assert ranks.float().mean().item() == pytest.approx((low + high - 1) / 2, abs=6 * mean_sd)
    # Chi-square with m − 1 = 93 degrees of freedom: mean 93, sd ≈ 13.6; 200 is > 7 sd away.
    chi2 = ((counts - n / m) ** 2 / (n / m)).sum().item()
    assert chi2 < 200


def test_replace_is_reproducible_under_manual_seed() -> None:
    codebook, _ = ranked_codebook()
    z = torch.randn(8, DIM, 4, 4)
    q = codebook.lookup(codebook.nearest(z))
    mask = torch.ones(8, 1, 4, 4)
    generator = LatentAnomalyGenerator()
    torch.manual_seed(123)
    first = generator.replace(codebook, z, q, mask)
    torch.manual_seed(123)
    second = generator.replace(codebook, z, q, mask)
    torch.manual_seed(124)
    third = generator.replace(codebook, z, q, mask)
    assert torch.equal(first, second)  # exact by construction: the same draws and the same kernels
    assert not torch.equal(first, third)


def test_replace_with_empty_mask_changes_nothing() -> None:
    codebook, _ = ranked_codebook()
    z = torch.randn(3, DIM, 4, 4)
    q = codebook.lookup(codebook.nearest(z))
    out = LatentAnomalyGenerator().replace(codebook, z, q, torch.zeros(3, 1, 4, 4))
    assert torch.equal(out, q)


# ------------------------------------------------------------------------------- image-space anomalies
def test_image_anomalies_blend_colour_and_image_inside_the_mask() -> None:
    """Without rotation: outside the mask the image is untouched; inside, out = (1 − β)·c + β·x."""
    torch.manual_seed(0)
    b = 300
    images = torch.rand(b, 3, 32, 32)
    out, masks = ImageAnomalyGenerator(rotation_probability=0.0)(images)
    assert out.shape == images.shape and masks.shape == (b, 1, 32, 32)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    outside = masks.expand_as(images) == 0
    assert torch.equal(out[outside], images[outside])  # exact: 0·blended + 1·image rounds to the image
    assert out.min() >= 0 and out.max() <= 1

    betas = []
    for i in range(b):
        inside = masks[i, 0].bool()
        if inside.sum() < 3:
            continue
        x, y = images[i][:, inside], out[i][:, inside]  # (3, N)
        # Per channel, y is affine in x with the same slope β and intercept (1 − β)·c_channel.
        design = torch.stack((x, torch.ones_like(x)), dim=-1).double()  # (3, N, 2)
        solution = torch.linalg.lstsq(design, y.double().unsqueeze(-1)).solution[..., 0]  # (3, 2)
        slope, intercept = solution[:, 0], solution[:, 1]
        assert torch.allclose(design @ solution.unsqueeze(-1), y.double().unsqueeze(-1), atol=1e-5)
        beta = slope.mean().item()
        assert torch.allclose(slope, torch.full_like(slope, beta), atol=1e-4), slope
        assert -1e-5 <= beta < 0.8
        colour = intercept / (1 - beta)
        assert (colour >= -1e-4).all() and (colour <= 1 + 1e-4).all()
        # Hence every pixel lies between the colour and the image value.
        lo, hi = torch.minimum(x, colour[:, None].float()), torch.maximum(x, colour[:, None].float())
        assert (y >= lo - 1e-5).all() and (y <= hi + 1e-5).all()
        betas.append(beta)
    assert len(betas) >= 50
    assert min(betas) < 0.2 and max(betas) > 0.6  # β spreads over U[0, 0.8)


def test_image_anomalies_empty_share_and_rotation_probability() -> None:
    torch.manual_seed(0)
    n = 3000
    images = torch.ones(n, 3, 32, 32)
    natural = empty_share(ImageAnomalyGenerator(rotation_probability=0.0, normal_probability=0.0)(images[:n])[1])
    out, masks = ImageAnomalyGenerator()(images)
    share = empty_share(masks)
    expected = 0.5 + 0.5 * natural
    assert abs(share - expected) < 0.05, (share, expected)

    # A rotated all-ones image has black (or partially black) corners; outside the mask that shows.
    outside = (masks == 0).expand_as(images)
    rotated = ((out != 1) & outside).flatten(1).any(1).float().mean().item()
    assert rotated == pytest.approx(0.3, abs=0.06)  # sd ≈ 0.008 for n = 3000

    # With rotation probability 1, every image is rotated.
    out, masks = ImageAnomalyGenerator(rotation_probability=1.0, normal_probability=1.0)(images[:200])
    assert masks.sum() == 0
    assert ((out != 1).flatten(1).any(1)).all()
    corners = out[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners < 1).any(dim=(1, 2)).all()
