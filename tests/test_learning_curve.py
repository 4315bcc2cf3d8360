"""Learning curves: image AUROC and pixel AP recorded during training, written as CSV and drawn as PNG."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
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
    assert set(metrics) == {"image_AUROC", "pixel_AP"} and all(0 <= v <= 1 for v in metrics.values())
