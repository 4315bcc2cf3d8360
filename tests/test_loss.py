"""DSR losses (docs/method.md#training): focal loss on softmax probabilities, the phase-2 sum and the phase-3 loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from anomalib_dsr.model.loss import DsrLoss, FocalLoss
from anomalib_dsr.model.torch_model import RestrictionTrainingOutput

SMOOTH = 1e-5


def probs_for(target: torch.Tensor, p_true: float) -> torch.Tensor:
    """Two-class probabilities ``(B, 2, H, W)`` giving ``p_true`` to the class in ``target`` ``(B, 1, H, W)``."""
    p1 = torch.where(target.bool(), p_true, 1 - p_true)
    return torch.cat((1 - p1, p1), dim=1)


@pytest.fixture
def target() -> torch.Tensor:
    torch.manual_seed(0)
    return (torch.rand(2, 1, 8, 8) < 0.3).float()


def test_perfect_prediction_costs_nothing(target: torch.Tensor) -> None:
    assert FocalLoss()(probs_for(target, 1.0), target).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("p_true", [0.5, 0.9, 0.2])
def test_known_values(target: torch.Tensor, p_true: float) -> None:
    """(1 − p)^γ · (−log p) with γ = 2, α = 1, up to the 1e-5 label smoothing."""
    expected = (1 - p_true) ** 2 * -math.log(p_true)
    assert FocalLoss()(probs_for(target, p_true), target).item() == pytest.approx(expected, rel=1e-3)


def test_confident_wrong_prediction_is_expensive_but_finite(target: torch.Tensor) -> None:
    loss = FocalLoss()(probs_for(target, 0.0), target).item()
    assert math.isfinite(loss)
    assert loss == pytest.approx(-math.log(2 * SMOOTH), rel=1e-3)  # p_t = smoothing only


def test_gamma_zero_is_cross_entropy_and_mean_over_pixels(target: torch.Tensor) -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 8, 8)
    ce = F.cross_entropy(logits, target[:, 0].long())
    assert FocalLoss(gamma=0.0)(logits.softmax(1), target).item() == pytest.approx(ce.item(), rel=1e-3)
    # Mean over pixels: half perfect, half at p = 0.5 gives half the p = 0.5 value.
    probs = probs_for(target, 1.0)
    probs[..., :4] = 0.5
    assert FocalLoss()(probs, target).item() == pytest.approx(0.5 * 0.25 * math.log(2), rel=1e-3)


def test_upsampling_loss_applies_softmax_once(target: torch.Tensor) -> None:
    """Phase 3 takes logits; confident correct logits must give ≈ 0 (a second softmax would not)."""
    logits = torch.where(torch.cat((1 - target, target), dim=1).bool(), 20.0, -20.0)
    assert DsrLoss().upsampling(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(2)
    logits = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(DsrLoss().upsampling(logits, target), FocalLoss()(logits.softmax(1), target))


def make_output(target: torch.Tensor, image_error: float, feature_error: float) -> RestrictionTrainingOutput:
    b = target.shape[0]
    torch.manual_seed(3)
    q_lo, q_hi = torch.randn(b, 4, 2, 2), torch.randn(b, 4, 4, 4)
    image = torch.rand(b, 3, 8, 8)
    logits = torch.randn(b, 2, 8, 8)
    return RestrictionTrainingOutput(
        restricted_lo=q_lo + feature_error,
        restricted_hi=q_hi - 2 * feature_error,
        target_lo=q_lo,
        target_hi=q_hi,
        image_spc=image + image_error,
        target_image=image,
        logits_lo=logits,
        target_mask=target,
    )


def test_focal_terms_take_softmax_in_fp32_from_bf16_logits(target: torch.Tensor) -> None:
    """Under bf16 autocast the logits are bf16; softmax there would round confident probabilities to steps of
    2^-8 below 1, where the focal loss lives. Both focal terms equal the fp32 softmax of the same logits."""
    logits = (torch.cat((1 - target, target), dim=1) * 2 - 1).mul(3.0).to(torch.bfloat16)  # right, p_t = 0.9975
    expected = FocalLoss()(logits.float().softmax(dim=1), target)
    assert FocalLoss()(logits.softmax(dim=1), target).item() != pytest.approx(expected.item(), rel=0.1)  # bf16 softmax
    # Exact by construction (rel=1e-6 is only a margin): the losses convert the bf16 logits to fp32 exactly and run
    # the same fp32 ops as ``expected``; a bf16 softmax is off by more than 10 % (asserted above).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert DsrLoss().upsampling(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
        images = torch.zeros(2, 3, 8, 8)
        out = RestrictionTrainingOutput(*(torch.zeros(2, 4, 2, 2),) * 4, images, images, logits, target)
        assert DsrLoss().restriction(out)["focal"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_restriction_loss_has_four_terms_with_image_weighted_ten(target: torch.Tensor) -> None:
    out = make_output(target, image_error=0.1, feature_error=0.3)
    terms = DsrLoss().restriction(out)
    assert set(terms) == {"focal", "feature_hi", "feature_lo", "image", "loss"}
    assert terms["feature_lo"].item() == pytest.approx(0.3**2, rel=1e-4)
    assert terms["feature_hi"].item() == pytest.approx(0.6**2, rel=1e-4)
    assert terms["image"].item() == pytest.approx(10 * 0.1**2, rel=1e-4)
    torch.testing.assert_close(terms["focal"], FocalLoss()(out.logits_lo.softmax(1), target))
    total = terms["focal"] + terms["feature_hi"] + terms["feature_lo"] + terms["image"]
    torch.testing.assert_close(terms["loss"], total)
    assert DsrLoss(image_weight=1.0).restriction(out)["image"].item() == pytest.approx(0.1**2, rel=1e-4)


def test_restriction_loss_gradients_reach_each_prediction(target: torch.Tensor) -> None:
    out = make_output(target, image_error=0.1, feature_error=0.3)
    leaves = [t.clone().requires_grad_() for t in (out.restricted_lo, out.restricted_hi, out.image_spc, out.logits_lo)]
    out = out._replace(restricted_lo=leaves[0], restricted_hi=leaves[1], image_spc=leaves[2], logits_lo=leaves[3])
    DsrLoss().restriction(out)["loss"].backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0
