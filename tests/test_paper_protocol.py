"""The paper's evaluation protocol (docs/method.md#inference): centre-crop pixel metrics, evaluator config, table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.metrics import AUPR, AUROC

from anomalib_dsr.cli import main as dsr_cli
from anomalib_dsr.evaluation.paper_protocol import CentreCropAUPR, CentreCropAUROC, PaperEvaluator, centre_crop
from anomalib_dsr.evaluation.paper_table import PAPER_IMAGE_AUROC, paper_table, parse_result, read_metrics

CONFIG = Path(__file__).parents[1] / "configs" / "eval" / "paper_protocol.yaml"


def batch_with_noisy_border(size: int = 32) -> ImageBatch:
    """Maps that find the defect in the centre but score the normal border highest."""
    generator = torch.Generator().manual_seed(0)
    gt_mask = torch.zeros(4, size, size, dtype=torch.bool)
    gt_mask[:2, 12:20, 12:20] = True
    anomaly_map = 0.5 * gt_mask + 0.1 * torch.rand(4, size, size, generator=generator)
    anomaly_map[:, :2] = 1.0  # the top two rows: outside a 7/8 crop (28 of 32 rows, offset 2)
    return ImageBatch(
        image=torch.rand(4, 3, size, size),
        gt_mask=gt_mask,
        gt_label=torch.tensor([1, 1, 0, 0]),
        anomaly_map=anomaly_map,
        pred_score=torch.tensor([0.9, 0.8, 0.3, 0.1]),
    )


def test_centre_crop_keeps_the_middle() -> None:
    x = torch.arange(256 * 256).view(1, 256, 256)
    crop = centre_crop(x, 224 / 256)
    assert crop.shape == (1, 224, 224)
    assert crop[0, 0, 0] == x[0, 16, 16] and crop[0, -1, -1] == x[0, 239, 239]


def test_crop_metrics_equal_full_metrics_on_cropped_tensors() -> None:
    batch = batch_with_noisy_border()
    fields = {"fields": ["anomaly_map", "gt_mask"]}
    cropped = ImageBatch(
        image=batch.image[..., 2:30, 2:30],
        gt_mask=batch.gt_mask[..., 2:30, 2:30],
        anomaly_map=batch.anomaly_map[..., 2:30, 2:30],
    )
    pairs = [(CentreCropAUROC(crop=28 / 32, **fields), AUROC(**fields))]
    pairs.append((CentreCropAUPR(crop=28 / 32, **fields), AUPR(**fields)))
    for ours, full in pairs:
        ours.update(batch)
        full.update(cropped)
        torch.testing.assert_close(ours.compute(), full.compute())
    # The border is what makes the difference here: full-image metrics are worse.
    full_image = AUROC(**fields)
    full_image.update(batch)
    assert CentreCropAUROC(crop=28 / 32, **fields)(batch) > 0.999
    assert full_image.compute() < 0.95


def test_paper_evaluator_names() -> None:
    names = [metric.name for metric in PaperEvaluator().test_metrics]
    assert names == [
        "image_AUROC",
        "image_AUPR",
        "pixel_AUROC",
        "pixel_AUPR",
        "pixel_CentreCropAUROC",
        "pixel_CentreCropAUPR",
    ]
    with pytest.raises(ValueError, match="crop"):
        PaperEvaluator(crop=1.5)


def test_paper_protocol_config_with_anomalib_test(tmp_path: Path, demo_root: Path, tiny_widths: dict[str, int]) -> None:
    """``anomalib test --model.evaluator configs/eval/paper_protocol.yaml`` logs the paper's metrics to CSV,
    and ``anomalib-dsr paper-table`` turns them into the table."""
    from anomalib.cli import AnomalibCLI

    from anomalib_dsr import DsrModel
    from anomalib_dsr.checkpoints.original_checkpoint import import_original, save_original

    save_original(DsrModel(**tiny_widths), tmp_path / "original", "gravel")
    ckpt = import_original(tmp_path / "original", "gravel", tmp_path / "model.ckpt")
    widths = [arg for name, value in tiny_widths.items() for arg in (f"--model.{name}", str(value))]
    cli = AnomalibCLI(
        args=[
            "test",
            "--model", "anomalib_dsr.Dsr", *widths,
            "--model.evaluator", str(CONFIG),
            "--model.visualizer", "false",
            "--ckpt_path", str(ckpt),
            "--data", "anomalib.data.MVTecAD",
            "--data.root", str(demo_root),
            "--data.category", "gravel",
            "--data.num_workers", "0",
            "--default_root_dir", str(tmp_path / "results"),
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(tmp_path / "csv"),
            "--trainer.logger.name", "gravel",
            "--trainer.logger.version", "0",
        ]
    )  # fmt: skip
    assert isinstance(cli.model.evaluator, PaperEvaluator)
    csv_file = tmp_path / "csv" / "gravel" / "version_0" / "metrics.csv"
    metrics = read_metrics(csv_file)
    assert {"image_AUROC", "image_AUPR", "pixel_CentreCropAUROC", "pixel_CentreCropAUPR"} <= set(metrics)
    # exact by construction: the same number, read back from the CSV's decimal text (approx: its last digit)
    assert metrics["image_AUROC"] == pytest.approx(float(cli.engine.trainer.callback_metrics["image_AUROC"]))

    dsr_cli(["paper-table", f"gravel={csv_file}", "--output", str(tmp_path / "table.md")])
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0] == "|  | gravel | mean |"
    assert table[2] == "| image AUROC, paper | – | – |"
    ours = f"{100 * metrics['image_AUROC']:.1f}"
    assert table[3] == f"| image AUROC, ours | {ours} | {ours} |"
    assert table[6].startswith(f"| pixel AUROC, 224 crop | {100 * metrics['pixel_CentreCropAUROC']:.1f} |")


def test_table_layout_and_difference(tmp_path: Path) -> None:
    (tmp_path / "Dsr" / "MVTecAD" / "metal_nut").mkdir(parents=True)
    (tmp_path / "Dsr" / "MVTecAD" / "metal_nut" / "metrics.json").write_text(
        json.dumps([{"image_AUROC": 0.99, "pixel_CentreCropAUPR": 0.7}])
    )
    (tmp_path / "b.csv").write_text("epoch,image_AUROC,step\n0,,\n0,0.97,0\n")
    category, path = parse_result(str(tmp_path / "Dsr" / "MVTecAD" / "metal_nut" / "metrics.json"))
    assert category == "metal_nut"
    results = {category: read_metrics(path), "bottle": read_metrics(tmp_path / "b.csv")}
    assert results["bottle"] == {"epoch": 0.0, "image_AUROC": 0.97, "step": 0.0}

    lines = paper_table(results).splitlines()
    assert lines == [
        "|  | bottle | metal nut | mean |",
        "|---|---|---|---|",
        "| image AUROC, paper | 100.0 | 98.5 | 99.2 |",
        "| image AUROC, ours | 97.0 | 99.0 | 98.0 |",
        "| difference | -3.0 | +0.5 | -1.2 |",
        "| pixel AP, 224 crop | – | 70.0 | 70.0 |",
    ]


def test_table_of_all_categories_has_the_papers_mean() -> None:
    table = paper_table({category: {"image_AUROC": 0.98} for category in PAPER_IMAGE_AUROC})
    paper_row = table.splitlines()[2].split(" | ")
    assert paper_row[-1] == "98.2 |"  # docs/method.md#reported-results: mean 98.2
    assert table.splitlines()[0].startswith("|  | bottle | capsule | grid | leather | pill | tile | transistor |")


def test_table_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CATEGORY="):
        parse_result(str(tmp_path / "results.json"))
    assert parse_result(f"wood={tmp_path / 'x.json'}") == ("wood", tmp_path / "x.json")
    with pytest.raises(SystemExit, match="paper-table: error"):
        dsr_cli(["paper-table", f"wood={tmp_path / 'missing.json'}"])
