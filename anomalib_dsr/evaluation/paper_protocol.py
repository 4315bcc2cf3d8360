"""The paper's evaluation protocol (docs/method.md#inference) as anomalib metrics.

The authors test at 256x256 input (``Dsr``'s default pre-processing) and compute the pixel metrics on the
224x224 centre crop of anomaly map and mask; image metrics use the whole image. :class:`PaperEvaluator`
logs both, next to anomalib's full-image pixel metrics:

- ``image_AUROC``, ``image_AUPR``: image AUROC and AP (anomalib's ``AUPR`` is step-wise average precision);
- ``pixel_AUROC``, ``pixel_AUPR``: pixel AUROC and AP on the full map, as anomalib computes them;
- ``pixel_CentreCropAUROC``, ``pixel_CentreCropAUPR``: pixel AUROC and AP on the centre crop, as in the paper.

With the anomalib CLI: ``anomalib test --model anomalib_dsr.Dsr --model.evaluator
configs/eval/paper_protocol.yaml ...``.
"""

from __future__ import annotations

import torch
from anomalib.metrics import AUPR, AUROC, AnomalibMetric, Evaluator
from anomalib.metrics.aupr import _AUPR
from anomalib.metrics.auroc import _AUROC

PAPER_CROP = 224 / 256  # docs/method.md#inference: 224x224 centre crop of a 256x256 map


def centre_crop(tensor: torch.Tensor, crop: float) -> torch.Tensor:
    """The centre ``round(crop * H) x round(crop * W)`` of the last two dimensions of ``tensor``."""
    height, width = tensor.shape[-2:]
    crop_h, crop_w = round(crop * height), round(crop * width)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return tensor[..., top : top + crop_h, left : left + crop_w]


class _CentreCrop:
    """Between ``AnomalibMetric`` and a torchmetrics metric: crops ``preds`` and ``target`` before the update."""

    def __init__(self, crop: float = PAPER_CROP, **kwargs) -> None:
        if not 0 < crop <= 1:
            msg = f"crop is the kept share of each side, in (0, 1]; got {crop}."
            raise ValueError(msg)
        super().__init__(**kwargs)
        self.crop = crop

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.shape[-2:] != target.shape[-2:]:
            msg = f"Anomaly map {tuple(preds.shape)} and mask {tuple(target.shape)} differ in size; cannot crop alike."
            raise ValueError(msg)
        super().update(centre_crop(preds, self.crop), centre_crop(target, self.crop))


class CentreCropAUROC(AnomalibMetric, _CentreCrop, _AUROC):  # type: ignore[misc]
    """Pixel AUROC on the centre ``crop`` (paper: 224/256) of ``anomaly_map`` and ``gt_mask``."""

    default_fields = ("anomaly_map", "gt_mask")


class CentreCropAUPR(AnomalibMetric, _CentreCrop, _AUPR):  # type: ignore[misc]
    """Pixel AP on the centre ``crop`` (paper: 224/256) of ``anomaly_map`` and ``gt_mask``."""

    default_fields = ("anomaly_map", "gt_mask")


class PaperEvaluator(Evaluator):
    """Test metrics of the paper's protocol and anomalib's full-image pixel metrics (see the module docstring).

    Args:
        crop: kept share of each side for the cropped pixel metrics (paper: 224/256).
        compute_on_cpu: as for ``anomalib.metrics.Evaluator``.
    """

    def __init__(self, crop: float = PAPER_CROP, compute_on_cpu: bool = True) -> None:
        pixel = {"fields": ["anomaly_map", "gt_mask"], "prefix": "pixel_", "strict": False}
        super().__init__(
            test_metrics=[
                AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                AUPR(fields=["pred_score", "gt_label"], prefix="image_"),
                AUROC(**pixel),
                AUPR(**pixel),
                CentreCropAUROC(crop=crop, **pixel),
                CentreCropAUPR(crop=crop, **pixel),
            ],
            compute_on_cpu=compute_on_cpu,
        )
