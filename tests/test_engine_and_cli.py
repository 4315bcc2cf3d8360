"""DSR through anomalib's ``Engine`` and ``anomalib`` CLI (``AnomalibCLI``) on the tiny demo dataset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from anomalib.cli import AnomalibCLI
from anomalib.engine import Engine

from conftest import CATEGORY, IMAGE_SIZE, TRAINER_KWARGS

METRICS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_AUPR")
NUM_TEST_IMAGES = 4 + 2 * 2  # good + two defect types


def check_predictions(batches: list, count: int) -> None:
    assert sum(len(batch.pred_score) for batch in batches) == count
    for batch in batches:
        b = len(batch.pred_score)
        assert batch.pred_score.shape == (b,)
        assert batch.anomaly_map.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
        assert batch.anomaly_map.reshape(b, -1).shape[1] == IMAGE_SIZE * IMAGE_SIZE
        assert batch.pred_label.shape == (b,) and batch.pred_label.dtype == torch.bool
        assert batch.pred_mask.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
        for value in (batch.pred_score, batch.anomaly_map):
            assert torch.isfinite(value).all() and value.min() >= 0 and value.max() <= 1


def test_engine_fit_test_predict(make_dsr, make_datamodule, tmp_path):
    model = make_dsr()
    datamodule = make_datamodule()
    engine = Engine(default_root_dir=tmp_path, max_steps=6, **TRAINER_KWARGS)
    engine.fit(model, datamodule=datamodule)
    assert model.global_step == 6 and model.phase2_steps == 4

    results = engine.test(model, datamodule=datamodule, verbose=False)
    assert len(results) == 1
    assert set(METRICS) <= set(results[0])
    for name in METRICS:
        assert 0.0 <= results[0][name] <= 1.0, name

    check_predictions(engine.predict(model, datamodule=datamodule), NUM_TEST_IMAGES)
    checkpoint = torch.load(engine.best_model_path, map_location="cpu", weights_only=False)
    assert checkpoint["dsr_phase2_steps"] == 4 and checkpoint["global_step"] == 6


# ------------------------------------------------------------------------------------------------------ CLI
def model_args(vq: Path, tiny_widths: dict[str, int]) -> list[str]:
    """``--model`` arguments: tiny widths and a 64x64 resize without normalisation."""
    resize = {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [IMAGE_SIZE, IMAGE_SIZE]}}
    pre_processor = {"class_path": "anomalib.pre_processing.PreProcessor", "init_args": {"transform": resize}}
    widths = [arg for name, value in tiny_widths.items() for arg in (f"--model.{name}", str(value))]
    return [
        "--model", "anomalib_dsr.Dsr",
        "--model.vq_weights", str(vq),
        *widths,
        "--model.pre_processor", json.dumps(pre_processor),
    ]  # fmt: skip


def data_args(root: Path, train_batch_size: int = 2) -> list[str]:
    return [
        "--data", "anomalib.data.MVTecAD",
        "--data.root", str(root),
        "--data.category", CATEGORY,
        "--data.train_batch_size", str(train_batch_size),
        "--data.eval_batch_size", "4",
        "--data.num_workers", "0",
    ]  # fmt: skip


QUIET_ARGS = [
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.accelerator", "cpu",
]  # fmt: skip


def test_cli_train_then_test_and_predict_from_checkpoint(vq_weights, demo_root, tiny_widths, tmp_path):
    args = [
        "train",
        *model_args(vq_weights, tiny_widths),
        *data_args(demo_root),
        "--trainer.max_steps", "6",
        *QUIET_ARGS,
        "--default_root_dir", str(tmp_path / "train"),
    ]  # fmt: skip
    train = AnomalibCLI(args=args)
    assert train.model.global_step == 6
    assert train.model.phase2_steps == 4
    trained_metrics = {name: float(train.engine.trainer.callback_metrics[name]) for name in METRICS}
    checkpoint = Path(train.engine.best_model_path)
    assert checkpoint.is_file()

    # test/predict take every weight from the checkpoint: the VQ file is not needed any more.
    no_vq = tmp_path / "gone.pckl"
    args = [
        "test",
        *model_args(no_vq, tiny_widths),
        *data_args(demo_root),
        "--ckpt_path", str(checkpoint),
        *QUIET_ARGS,
        "--default_root_dir", str(tmp_path / "test"),
    ]  # fmt: skip
    test = AnomalibCLI(args=args)
    tested = {name: float(test.engine.trainer.callback_metrics[name]) for name in METRICS}
    # Exact by construction: the checkpoint holds the trained weights bit for bit, and in one process both runs take
    # the algorithms timed first (the timed choices, _FASTEST and _ALGORITHM, are cached per architecture for the
    # process), on the same batches: the same scores, the same metrics. In separate processes timing may pick other
    # kernels, whose rounding can swap near-tied images: then compare in swapped pairs (docs/development.md).
    assert tested == pytest.approx(trained_metrics, abs=1e-6)
    assert test.model.phase2_steps == 4

    images = demo_root / CATEGORY / "test" / "scratch"
    args = [
        "predict",
        *model_args(no_vq, tiny_widths),
        "--data", str(images),
        "--ckpt_path", str(checkpoint),
        *QUIET_ARGS,
        "--default_root_dir", str(tmp_path / "predict"),
    ]  # fmt: skip
    predict = AnomalibCLI(args=args)
    check_predictions(predict.engine.trainer.predict_loop.predictions, len(list(images.glob("*.png"))))


def test_cli_one_epoch_trains_both_phases_and_logs_them(vq_weights, demo_root, tiny_widths, tmp_path):
    """``--trainer.max_epochs 1``: 8 images in batches of 2 are 4 steps, 3 in phase 2 and 1 in phase 3."""
    args = [
        "fit",
        *model_args(vq_weights, tiny_widths),
        *data_args(demo_root, train_batch_size=2),
        "--trainer.max_epochs", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(tmp_path / "logs"),
        *QUIET_ARGS,
        "--default_root_dir", str(tmp_path / "fit"),
    ]  # fmt: skip
    cli = AnomalibCLI(args=args)
    assert cli.model.global_step == 4
    assert cli.model.phase2_steps == round(4 * 2 / 3)
    (metrics_file,) = (tmp_path / "logs").rglob("metrics.csv")
    with metrics_file.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/phase")]
    phases = [float(row["train/phase"]) for row in sorted(rows, key=lambda row: int(row["step"]))]
    assert phases == [2.0, 2.0, 2.0, 3.0]
    # Phase-2 loss terms are logged in phase 2 only.
    phase2_rows = [row for row in rows if float(row["train/phase"]) == 2.0]
    assert all(row["train/focal"] and row["train/image"] for row in phase2_rows)
