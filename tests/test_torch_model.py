"""The DSR torch model with tiny widths (docs/method.md): shapes, anomaly injection, frozen VQ-VAE, scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch

from anomalib_dsr.model.loss import DsrLoss
from anomalib_dsr.model.torch_model import DsrModel, RestrictionTrainingOutput, score_window_for

SIZE = 64


@pytest.fixture
def model(tiny_widths: dict[str, int]) -> DsrModel:
    torch.manual_seed(0)
    return DsrModel(**tiny_widths)


def force_levels(model: DsrModel, lo: list[bool], hi: list[bool]) -> None:
    """Make the latent generator use the given per-image levels instead of sampling them."""
    levels = torch.tensor(lo), torch.tensor(hi)
    model.latent_anomalies.sample_levels = lambda batch_size, device: (levels[0].to(device), levels[1].to(device))


def record_restore_inputs(model: DsrModel) -> dict[str, torch.Tensor]:
    """Record the (possibly anomalous) quantised features handed to the restriction modules."""
    seen: dict[str, torch.Tensor] = {}
    original = model.restore

    def restore(q_lo, q_hi):
        seen.update(q_lo=q_lo.clone(), q_hi=q_hi.clone())
        return original(q_lo, q_hi)

    model.restore = restore
    return seen


def test_forward_returns_scores_and_maps_in_unit_interval(model: DsrModel) -> None:
    model.eval()
    for height, width in ((SIZE, SIZE), (SIZE, 96)):
        images = torch.rand(2, 3, height, width)
        with torch.no_grad():
            out = model(images)
        assert isinstance(out, InferenceBatch)
        assert out.pred_score.shape == (2,)
        assert out.anomaly_map.shape == (2, height, width)
        for value in (out.pred_score, out.anomaly_map):
            assert torch.isfinite(value).all()
            assert value.min() >= 0 and value.max() <= 1


def test_pred_score_is_max_of_21x21_average_of_lo_map(model: DsrModel) -> None:
    """Image score: anomaly channel of softmax(M_lo), 21x21 mean with zero padding counted, then max."""
    model.score_window = 21  # the paper's fixed window, at any size
    model.eval()
    images = torch.rand(3, 3, SIZE, SIZE)
    with torch.no_grad():
        out = model(images)
        image_spc, image_gen, probs_lo = model.detect(images)
        probs = model.upsampling(torch.cat((image_spc, image_gen, probs_lo), dim=1)).softmax(dim=1)
    assert torch.allclose(probs_lo.sum(1), torch.ones(3, SIZE, SIZE), atol=1e-5)
    padded = F.pad(probs_lo[:, 1:], (10, 10, 10, 10))  # zeros, counted in the average
    window_mean = F.conv2d(padded, torch.full((1, 1, 21, 21), 1 / 441))
    assert window_mean.shape == (3, 1, SIZE, SIZE)
    # Two kernels (two 1-D average pools against one 21x21 convolution): a float32 sum of n ≤ 441 terms in [0, 1]
    # errs by at most n·eps32/2 = 2.6e-5 of it, in any order (seen: 1e-7); a window of 19 or 23, or uncounted
    # padding, moves the score by 1.5e-3 or more. probs_lo is bit for bit the one ``out`` scored: the same calls on
    # the same batch, with the algorithms the first call chose.
    torch.testing.assert_close(out.pred_score, window_mean.flatten(1).amax(1), rtol=3e-5, atol=1e-6)
    # Not simply the maximum of the map, nor of the upsampled map.
    assert not torch.allclose(out.pred_score, probs_lo[:, 1].flatten(1).amax(1))
    # The pixel map is the upsampling module's anomaly probability.
    torch.testing.assert_close(out.anomaly_map, probs[:, 1])


def test_score_window_scales_with_the_image_side(model: DsrModel) -> None:
    """21x21 at 256 (paper), odd and proportional elsewhere: one hot pixel in the middle scores 1/window²."""
    assert score_window_for(256, 256) == (21, 21)
    assert score_window_for(128, 128) == (11, 11)
    assert score_window_for(64, 512) == (5, 41)
    for height, width in ((64, 64), (128, 128), (256, 256), (64, 128)):
        probs_lo = torch.zeros(1, 2, height, width)
        probs_lo[0, 1, height // 2, width // 2] = 1.0
        kh, kw = score_window_for(height, width)
        torch.testing.assert_close(model.image_score(probs_lo), torch.tensor([1 / (kh * kw)]))
    model.score_window = 21
    torch.testing.assert_close(model.image_score(probs_lo), torch.tensor([1 / 441]))


def test_forward_restriction_training_shapes(model: DsrModel, tiny_widths: dict[str, int]) -> None:
    model.train()
    b, d = 4, tiny_widths["embedding_dim"]
    images = torch.rand(b, 3, SIZE, SIZE)
    masks = torch.zeros(b, 1, SIZE, SIZE)
    masks[:, :, 10:30, 20:50] = 1
    out = model.forward_restriction_training(images, masks)
    assert isinstance(out, RestrictionTrainingOutput)
    assert out.restricted_lo.shape == out.target_lo.shape == (b, d, SIZE // 8, SIZE // 8)
    assert out.restricted_hi.shape == out.target_hi.shape == (b, d, SIZE // 4, SIZE // 4)
    assert out.image_spc.shape == out.target_image.shape == (b, 3, SIZE, SIZE)
    assert out.logits_lo.shape == (b, 2, SIZE, SIZE)
    assert out.target_mask.shape == (b, 1, SIZE, SIZE)
    # The reconstruction target is the input in the VQ-VAE's BGR order (docs/method.md#input); exact: a copy.
    assert torch.equal(out.target_image, images.flip(1))
    # Gradients reach the trainable modules only through the loss terms that concern them.
    assert out.restricted_lo.requires_grad and out.image_spc.requires_grad and out.logits_lo.requires_grad
    assert not out.target_lo.requires_grad and not out.target_mask.requires_grad


def test_empty_mask_injects_nothing(model: DsrModel) -> None:
    model.train()
    force_levels(model, [True, True, False], [True, False, True])  # both, lo only, hi only
    seen = record_restore_inputs(model)
    images = torch.rand(3, 3, SIZE, SIZE)
    out = model.forward_restriction_training(images, torch.zeros(3, 1, SIZE, SIZE))
    # exact by construction: quantised features are copies of codebook rows, and nothing is replaced
    assert torch.equal(out.target_mask, torch.zeros(3, 1, SIZE, SIZE))
    assert torch.equal(seen["q_lo"], out.target_lo)
    assert torch.equal(seen["q_hi"], out.target_hi)
    encoded = model.vq.encode(images.flip(1))  # the same encoder on the same batch, layout and threads: same codes
    assert torch.equal(out.target_lo, encoded.q_lo) and torch.equal(out.target_hi, encoded.q_hi)


def test_levels_and_blocky_target_masks(model: DsrModel) -> None:
    """Per image: both levels, lo only, hi only, and the blocky ground truth (docs/method.md#simulated-anomalies)."""
    model.train()
    force_levels(model, [True, True, False], [True, False, True])
    seen = record_restore_inputs(model)
    images = torch.rand(3, 3, SIZE, SIZE)
    masks = torch.zeros(3, 1, SIZE, SIZE)
    masks[:, :, 9:19, 21:42] = 1  # not aligned to either grid
    out = model.forward_restriction_training(images, masks)

    changed_lo = (seen["q_lo"] != out.target_lo).any(1)  # (B, H/8, W/8)
    changed_hi = (seen["q_hi"] != out.target_hi).any(1)  # (B, H/4, W/4)
    mask_lo = F.max_pool2d(masks, 8)[:, 0].bool()
    mask_hi = F.max_pool2d(masks, 4)[:, 0].bool()
    # Lo anomalies exactly on the pooled lo mask (K = 32: the nearest code is never a replacement).
    assert torch.equal(changed_lo[0], mask_lo[0]) and torch.equal(changed_lo[1], mask_lo[1])
    assert not changed_lo[2].any(), "hi only: lo stays the clean quantisation"
    # Hi anomalies replace every masked hi position; lo only keeps the clean hi quantisation.
    assert changed_hi[0][mask_hi[0]].all() and changed_hi[2][mask_hi[2]].all()
    assert not changed_hi[2][~mask_hi[2]].any()
    assert not changed_hi[1].any()

    # Ground truth: the mask pooled to the deciding level's grid, nearest-upsampled back.
    for i, cell in ((0, 8), (1, 8), (2, 4)):
        target = out.target_mask[i : i + 1]
        expected = F.interpolate(F.max_pool2d(masks[i : i + 1], cell), scale_factor=cell, mode="nearest")
        assert torch.equal(target, expected)
        blocks = F.max_pool2d(target, cell) - (-F.max_pool2d(-target, cell))  # max − min per cell
        assert (blocks == 0).all(), f"target mask of image {i} is not constant on {cell}x{cell} cells"
        assert (target >= masks[i : i + 1]).all()
    assert not torch.equal(out.target_mask[0], out.target_mask[2])  # the two grids differ for this mask


def test_vq_vae_stays_frozen_during_a_training_step(model: DsrModel) -> None:
    model.train()
    assert not model.vq.training
    assert not any(module.training for module in model.vq.modules())
    assert model.restriction_lo.training and model.anomaly_detection.training
    assert not any(p.requires_grad for p in model.vq.parameters())

    vq_before = {k: v.clone() for k, v in model.vq.state_dict().items()}
    trainable_before = {k: v.clone() for k, v in model.restriction_lo.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    images = torch.rand(2, 3, SIZE, SIZE)
    masks = torch.ones(2, 1, SIZE, SIZE)
    loss = DsrLoss().restriction(model.forward_restriction_training(images, masks))["loss"]
    loss.backward()
    optimizer.step()
    # The EMA codebooks are used in forward() in training mode; they must not move.
    with torch.no_grad():
        model.vq.codebook_lo(torch.randn(2, model.vq.codebook_lo.embedding.embedding_dim, 8, 8))
    for key, value in model.vq.state_dict().items():
        assert torch.equal(value, vq_before[key]), f"VQ-VAE tensor {key} changed"
    assert all(p.grad is None for p in model.vq.parameters())
    assert any(not torch.equal(v, trainable_before[k]) for k, v in model.restriction_lo.state_dict().items())
    # The upsampling module gets no gradient in phase 2.
    assert all(p.grad is None for p in model.upsampling.parameters())


def test_phase3_forward_trains_only_the_upsampling_module(model: DsrModel) -> None:
    model.train()
    logits = model.forward_upsampling_training(torch.rand(2, 3, SIZE, SIZE))
    assert logits.shape == (2, 2, SIZE, SIZE)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.upsampling.parameters())
    others = (model.restriction_lo, model.restriction_hi, model.object_decoder, model.anomaly_detection, model.vq)
    assert all(p.grad is None for module in others for p in module.parameters())


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 3, 60, 64), "multiples of 32"),
        ((1, 3, 72, 72), "multiples of 32"),
        ((1, 3, 32, 32), "larger than 32x32"),
        ((1, 1, 64, 64), r"RGB images of shape \(B, 3, H, W\)"),
        ((1, 4, 64, 64), r"RGB images"),
        ((3, 64, 64), r"RGB images"),
    ],
)
def test_bad_input_shapes_raise_clear_errors(model: DsrModel, shape: tuple[int, ...], match: str) -> None:
    images = torch.rand(*shape)
    with pytest.raises(ValueError, match=match):
        model.eval()(images)
    if len(shape) == 4:
        with pytest.raises(ValueError, match=match):
            model.train().forward_restriction_training(images, torch.zeros(shape[0], 1, *shape[-2:]))


def record_codes(model: DsrModel) -> list[torch.Tensor]:
    """Record the indices of every quantisation of ``model`` (both codebooks, in call order)."""
    seen: list[torch.Tensor] = []
    for codebook in (model.vq.codebook_lo, model.vq.codebook_hi):
        nearest = codebook.nearest

        def recorded(z: torch.Tensor, nearest=nearest) -> torch.Tensor:
            seen.append(nearest(z))
            return seen[-1]

        codebook.nearest = recorded
    return seen


def test_bf16_autocast_keeps_fp32_codes(model: DsrModel) -> None:
    """Under bf16 autocast the VQ encoders and restriction modules stay in float32: all four code choices are
    fp32's, while the decoders and U-Nets do run in bf16 (the map moves; how far matters only for a trained model,
    whose metrics benchmarks/bf16_accuracy.py compares: random U-Nets amplify any rounding)."""
    model.eval()
    codes = record_codes(model)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32 = model(images)
        fp32_codes = list(codes)
        codes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(images)
    assert len(fp32_codes) == len(codes) == 4
    # exact by construction: the code path runs with autocast disabled, so both calls are the same fp32 kernels on
    # the same input; a bf16 op there would move codes (what this catches)
    for ours, reference in zip(codes, fp32_codes, strict=True):
        assert torch.equal(ours, reference)
    difference = (bf16.anomaly_map.float() - fp32.anomaly_map).abs()
    assert difference.max() > 0 and torch.isfinite(bf16.anomaly_map).all()


def test_bf16_training_keeps_fp32_codes(model: DsrModel) -> None:
    """bf16-mixed training as inference does: the code path (VQ encoders, replacement codes, restriction) in float32,
    so the anomalies, the restricted features and every code are fp32's; D_spc and the U-Net run in bf16."""
    model.train()
    codes = record_codes(model)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    masks = (torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    torch.manual_seed(3)
    fp32 = model.forward_restriction_training(images, masks)
    fp32_codes = list(codes)
    codes.clear()
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.forward_restriction_training(images, masks)
    assert len(codes) == len(fp32_codes) >= 4
    # exact by construction: the code path runs with autocast disabled (same fp32 kernels, same input, same seeded
    # draws), so codes, anomalies, restricted features and masks are bit for bit fp32's; a bf16 op there would not be
    for ours, reference in zip(codes, fp32_codes, strict=True):
        assert torch.equal(ours, reference)
    for name in ("restricted_lo", "restricted_hi", "target_lo", "target_hi", "target_mask"):
        assert torch.equal(getattr(bf16, name), getattr(fp32, name)), name
    assert bf16.image_spc.dtype == bf16.logits_lo.dtype == torch.bfloat16


def test_general_decoder_shows_kept_codes_as_i_gen_does(tiny_widths: dict[str, int]) -> None:
    """``spc_decoder="general"``: no D_spc; I_spc is D_gen's image of the restricted codes, so where the restriction
    keeps every code I_spc equals I_gen, while the paper's D_spc draws its own image of the same codes."""
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    general = DsrModel(**tiny_widths, spc_decoder="general").eval()
    torch.manual_seed(0)
    specific = DsrModel(**tiny_widths).eval()
    assert general.object_decoder is None and specific.object_decoder is not None
    with torch.no_grad():
        changed = general.stages(images)  # untrained restriction modules move the codes
        for model in (general, specific):
            model.restriction_lo.forward = model.restriction_hi.forward = lambda q: q  # keep every code
        kept, paper = general.stages(images), specific.stages(images)
    # The re-quantised codes are the input codes up to the straight-through estimator's rounding, z + (code - z):
    # one ulp of a code (1.2e-7 seen), which D_gen carries into the image at 3e-8; a changed code moves it > 1e-3.
    torch.testing.assert_close(kept.image_spc, kept.image_gen, rtol=0, atol=1e-6)
    assert (changed.image_spc - changed.image_gen).abs().amax() > 1e-3
    assert (paper.image_spc - paper.image_gen).abs().amax() > 1e-3
    with pytest.raises(ValueError, match=r"spc_decoder must be one of \('specific', 'general'\), got 'D_gen'"):
        DsrModel(**tiny_widths, spc_decoder="D_gen")
