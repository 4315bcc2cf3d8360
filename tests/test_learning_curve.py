"""Learning curves: image AUROC and pixel AP recorded during training, written as CSV and drawn as PNG."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from anomalib.engine import Engine
from PIL import Image

from anomalib_dsr.evaluation.learning_curve import LearningCurve, evaluate, save_curve_chart

from conftest import TRAINER_KWARGS


def test_dsr_curve_points_csv_and_chart(make_dsr, make_datamodule, tmp_path: Path) -> None:
    model, datamodule = make_dsr(), make_datamodule()
    curve = LearningCurve(points=3, output=tmp_path / "curve.csv")
    engine = Engine(max_steps=6, callbacks=[curve], default_root_dir=tmp_path, logger=False, **TRAINER_KWARGS)
    engine.fit(model, datamodule=datamodule)

    assert [row["step"] for row in curve.rows] == [2, 4, 6]  # evenly spaced, the last at the end
    for row in curve.rows:
        assert 0 <= row["image_AUROC"] <= 1 and 0 <= row["pixel_AP"] <= 1
    seconds = [row["train_seconds"] for row in curve.rows]
    assert 0 < seconds[0] < seconds[1] < seconds[2]
    with (tmp_path / "curve.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == [2, 4, 6]
    assert float(rows[-1]["image_AUROC"]) == curve.rows[-1]["image_AUROC"]  # exact: csv writes repr(float)
    # The model is back in training mode where it was (the VQ-VAE stays in eval mode).
    assert model.model.restriction_lo.training and not model.model.vq.training

    chart = save_curve_chart({"DSR": curve.rows}, tmp_path / "curve.png", x="step")
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.width >= 800  # two panels


def test_dsr_curve_uses_lo_map_until_phase_3(make_dsr, make_datamodule) -> None:
    """Before phase 3 the upsampling module is untrained: the curve scores P_lo's map; afterwards the model's."""
    model = make_dsr().eval()
    model.phase2_steps = 0  # global_step 0: the upsampling module has not trained a step yet
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        _, _, probs_lo = model.model.detect(images)
        full = model.model(images)
        early = model.curve_predictions(images)
        torch.testing.assert_close(early.anomaly_map, probs_lo[:, 1])
        torch.testing.assert_close(early.pred_score, full.pred_score)
        model.phase2_steps = None  # not trained here (e.g. imported weights): the model's own outputs
        torch.testing.assert_close(model.curve_predictions(images).anomaly_map, full.anomaly_map)
    # Evaluation on a datamodule's test set: the known labels of the demo data give numbers in [0, 1].
    datamodule = make_datamodule()
    datamodule.setup()
    metrics = evaluate(model, datamodule.test_dataloader())
    assert set(metrics) == {"image_AUROC", "pixel_AP", "map_image_AUROC"}
    assert all(0 <= v <= 1 for v in metrics.values())


class MapOnly(torch.nn.Module):
    """A model whose anomaly map marks the defect image's blob and whose image score ranks the images backwards."""

    pre_processor = None
    device = torch.device("cpu")

    def model(self, images: torch.Tensor) -> InferenceBatch:
        blob = images.mean(1)  # the defective test images carry a bright 9x9 square, the good ones are dark
        return InferenceBatch(pred_score=images.mean((1, 2, 3)), anomaly_map=blob)


def test_map_image_auroc_scores_the_map_through_the_score_window() -> None:
    """A 9x9 bright square in 3 of 6 images: the map's windowed maximum separates them (AUROC 1) while the model's
    own score puts them last (AUROC 0); a single bright pixel in the good images is smoothed away by the window."""
    from anomalib.data import ImageBatch

    images = torch.zeros(6, 3, 64, 64)
    images[:3, :, 20:29, 30:39] = 1.0  # anomalous
    images[3:, :, 5, 5] = 1.0  # one hot pixel: its 5x5 average (the window at 64 px) is 0.09, the square's 1.0
    images[3:] += 0.05  # brighter on average than the anomalous ones: pred_score ranks them backwards
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    batch = ImageBatch(image=images, gt_label=labels, gt_mask=(images[:, :1] > 0.5).float())
    metrics = evaluate(MapOnly(), [batch])
    assert metrics["image_AUROC"] == 0.0
    assert metrics["map_image_AUROC"] == 1.0
