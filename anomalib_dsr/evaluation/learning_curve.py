"""Learning curves: image AUROC and pixel AP at several points during training, against step and wall time.

:class:`LearningCurve` is a Lightning callback for any anomalib model trained by steps (DSR, DRAEM, …). At
``points`` evenly spaced steps it runs the model in eval mode over the datamodule's test images and records
image AUROC (``pred_score``), pixel AP (``anomaly_map`` against the masks, when the test set has masks) and the image
AUROC of a score taken from the anomaly map itself (its maximum after DSR's score window, the lever "image score from
the upsampled map"), with the training wall time so far (evaluation time excluded). A memory-bank model (anomalib's
``MemoryBankMixin``: PatchCore, PaDiM, …) only collects features and can score nothing before its bank is built
at the end of the epoch: its curve is one point, measured when training ends.
It is a report of progress on the test set; nothing is selected on it.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from anomalib.models.components import MemoryBankMixin
from lightning.pytorch.callbacks import Callback
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from anomalib_dsr.model.torch_model import score_window_for, window_max

logger = logging.getLogger(__name__)


class LearningCurve(Callback):
    """Records ``{"step", "train_seconds", "image_AUROC", "pixel_AP", "map_image_AUROC"}`` at ``points`` steps into
    :attr:`rows`.

    Args:
        points: number of evaluations, evenly spaced over the trainer's steps (the last one at the end).
        output: CSV file to write the rows to at the end of training (``None``: keep them in memory only).
    """

    def __init__(self, points: int = 6, output: str | Path | None = None) -> None:
        if points < 1:
            msg = f"points must be at least 1, got {points}."
            raise ValueError(msg)
        self.points = points
        self.output = Path(output) if output is not None else None
        self.rows: list[dict[str, float]] = []
        self._steps: set[int] = set()
        self._single_point = False
        self._start = 0.0
        self._eval_seconds = 0.0

    @property
    def eval_seconds(self) -> float:
        """Wall time spent in this callback's evaluations (inside ``fit``; not training time)."""
        return self._eval_seconds

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = int(trainer.estimated_stepping_batches)
        # Memory-bank models (PatchCore) can be scored only once their bank is built: one point when training ends.
        self._single_point = isinstance(pl_module, MemoryBankMixin)
        steps = {max(1, round(total * (i + 1) / self.points)) for i in range(self.points)}
        self._steps = set() if self._single_point else steps
        self._start, self._eval_seconds = time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step not in self._steps or not trainer.is_global_zero:
            return
        self._steps.discard(trainer.global_step)  # several optimisers may report one step twice
        self._record(trainer, pl_module)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        row = {"step": trainer.global_step, "train_seconds": started - self._start - self._eval_seconds}
        row.update(self.measure(trainer, pl_module))
        self.rows.append(row)
        self._eval_seconds += time.perf_counter() - started
        logger.info("Learning curve: %s", ", ".join(f"{k} {v:.4g}" for k, v in row.items()))

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The figures of one point: image AUROC and pixel AP on the datamodule's test set."""
        return evaluate(pl_module, trainer.datamodule.test_dataloader())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._single_point and trainer.is_global_zero:
            self._record(trainer, pl_module)  # after the last epoch: PatchCore's memory bank is subsampled by now
        if self.output is not None and self.rows and trainer.is_global_zero:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            with self.output.open("w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=list(self.rows[0]))
                writer.writeheader()
                writer.writerows(self.rows)


@torch.no_grad()
def evaluate(pl_module: pl.LightningModule, dataloader: torch.utils.data.DataLoader) -> dict[str, float]:
    """Image AUROC, pixel AP and map image AUROC of ``pl_module`` on ``dataloader``'s anomalib batches; modes restored
    after.

    The model sees the pre-processor's transform of each image (as in testing); maps are resized to the masks. The map
    image score is the maximum of the anomaly map at the model's resolution averaged over :func:`score_window_for` its
    size (DSR's image score, applied to the final map instead of P_lo).
    A module may define ``curve_predictions(images)`` to say which outputs stand for it mid-training.
    """
    modes = {module: module.training for module in pl_module.modules()}
    pl_module.eval()
    predict = getattr(pl_module, "curve_predictions", pl_module.model)
    transform = getattr(pl_module.pre_processor, "transform", None)
    scores, map_scores, labels, maps, masks = [], [], [], [], []
    try:
        for batch in dataloader:
            images = batch.image.to(pl_module.device)
            output = predict(transform(images) if transform is not None else images)
            scores.append(output.pred_score.flatten().float().cpu())
            labels.append(batch.gt_label.flatten().int().cpu())
            if output.anomaly_map is None:
                continue
            amap = output.anomaly_map.reshape(len(images), 1, *output.anomaly_map.shape[-2:]).float().cpu()
            map_scores.append(window_max(amap, score_window_for(*amap.shape[-2:])))
            if batch.gt_mask is not None:
                mask = batch.gt_mask.reshape(len(images), 1, *batch.gt_mask.shape[-2:])
                maps.append(F.interpolate(amap, size=mask.shape[-2:], mode="bilinear", align_corners=False).flatten())
                masks.append(mask.flatten().int().cpu())
    finally:
        for module, mode in modes.items():
            module.train(mode)
    labels_all = torch.cat(labels)
    both_labels = labels_all.unique().numel() == 2
    row = {
        "image_AUROC": float(binary_auroc(unit_interval(torch.cat(scores)), labels_all)) if both_labels else math.nan
    }
    masks_all = torch.cat(masks) if masks else None
    has_pixels = masks_all is not None and masks_all.any()
    maps_all = unit_interval(torch.cat(maps)) if has_pixels else None
    row["pixel_AP"] = float(binary_average_precision(maps_all, masks_all)) if has_pixels else math.nan
    has_map_scores = both_labels and len(map_scores) == len(scores)
    row["map_image_AUROC"] = (
        float(binary_auroc(unit_interval(torch.cat(map_scores)), labels_all)) if has_map_scores else math.nan
    )
    return row


def unit_interval(values: torch.Tensor) -> torch.Tensor:
    """``values`` rescaled into [0, 1] if they leave it (same order: AUROC and AP unchanged).

    torchmetrics takes scores outside [0, 1] for logits and applies a sigmoid, which saturates unbounded scores
    such as PatchCore's feature distances (sigmoid(30) == sigmoid(60) == 1.0 in float32) into ties.
    """
    low, high = values.min(), values.max()
    if low >= 0 and high <= 1:
        return values
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


def save_curve_chart(curves: dict[str, list[dict[str, float]]], path: str | Path, x: str = "train_seconds") -> Path:
    """Draw image AUROC and pixel AP against ``x`` (``train_seconds`` or ``step``), one line per curve name."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    metrics = [
        m for m in ("image_AUROC", "pixel_AP") if any(not math.isnan(r[m]) for rows in curves.values() for r in rows)
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for name, rows in curves.items():
            ax.plot([r[x] for r in rows], [r[metric] for r in rows], marker="o", label=name)
        ax.set_xlabel("training wall time (s)" if x == "train_seconds" else "training step")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_ylim(0, 1)
        ax.set_xlim(left=0)  # a one-point curve (PatchCore) is placed on the same scale as the others
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
