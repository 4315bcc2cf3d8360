"""DSR losses (docs/method.md#training)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_dsr.model.torch_model import RestrictionTrainingOutput


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if its precision is lower (bf16 under autocast); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class FocalLoss(nn.Module):
    """Binary focal loss on softmax probabilities, averaged over pixels.

    Args:
        gamma: focusing parameter (paper: 2).
        alpha: class weight, the same for both classes (paper: 1).
        smooth: label smoothing (paper: 1e-5).
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 1.0, smooth: float = 1e-5) -> None:
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha
        self.smooth = smooth

    def forward(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``probs`` ``(B, 2, H, W)`` (already softmaxed), ``target`` ``(B, 1, H, W)`` in {0, 1} → scalar."""
        target = torch.cat((1 - target, target), dim=1).clamp(self.smooth, 1 - self.smooth)
        pt = (target * at_least_fp32(probs)).sum(dim=1) + self.smooth
        return (-self.alpha * (1 - pt).pow(self.gamma) * pt.log()).mean()


class DsrLoss(nn.Module):
    """Phase 2: focal(softmax(M_lo), mask) + MSE(F̃_hi, Q_hi) + MSE(F̃_lo, Q_lo) + 10·MSE(I_spc, image).

    Phase 3: focal(softmax(M), mask). ``image_weight`` is the paper's 10.
    """

    def __init__(self, image_weight: float = 10.0) -> None:
        super().__init__()
        self.focal = FocalLoss()
        self.image_weight = image_weight

    def restriction(self, out: RestrictionTrainingOutput) -> dict[str, torch.Tensor]:
        """Phase-2 loss terms and their sum under ``"loss"``."""
        terms = {
            "focal": self.focal(at_least_fp32(out.logits_lo).softmax(dim=1), out.target_mask),
            "feature_hi": F.mse_loss(at_least_fp32(out.restricted_hi), at_least_fp32(out.target_hi)),
            "feature_lo": F.mse_loss(at_least_fp32(out.restricted_lo), at_least_fp32(out.target_lo)),
            "image": self.image_weight * F.mse_loss(at_least_fp32(out.image_spc), at_least_fp32(out.target_image)),
        }
        terms["loss"] = sum(terms.values())
        return terms

    def upsampling(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Phase-3 loss: focal loss on softmax(M) ``(B, 2, H, W)`` against full-resolution masks."""
        return self.focal(at_least_fp32(logits).softmax(dim=1), masks)
