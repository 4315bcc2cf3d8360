"""Choose DSR settings for ELPV on its validation split, never on the benchmark's test set.

``prepare_elpv(..., max_test_per_class=100)`` (as in ``configs/benchmark/elpv.yaml``) puts the cells beyond the
test cap into ``<type>/val/{good,defect}``: 84 defect-free and 302 defective poly cells, 18 and 213 mono ones. This
script trains DSR on ``<type>/train/good`` with the benchmark's settings, overridden by ``--set``, and prints the
validation image AUROC at several steps for several score windows (the image score is the maximum of P_lo's
anomaly channel averaged over a ``w x w`` window; 11 is the default at 128x128).

Usage (from the repository root; one run takes about as long as the benchmark's DSR job):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/elpv_validation.py --cell poly
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/elpv_validation.py --cell poly --set rotation_probability=0.4
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from anomalib.data import Folder
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torchmetrics.functional.classification import binary_auroc

from anomalib_dsr import Dsr
from anomalib_dsr.data.elpv import prepare_elpv
from anomalib_dsr.evaluation.learning_curve import LearningCurve
from anomalib_dsr.model.torch_model import window_max

WINDOWS = (1, 5, 11, 21)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, default=Path("configs/benchmark/elpv.yaml"), help="benchmark config to start from"
    )
    parser.add_argument("--cell", choices=("mono", "poly"), default="poly")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps (default: the benchmark's)")
    parser.add_argument("--evaluations", type=int, default=5, help="evenly spaced over training (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="override a Dsr argument (YAML value)"
    )
    return parser.parse_args()


def dsr_settings(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The benchmark's DSR ``init_args`` and ``trainer`` sections."""
    for entry in config["benchmark"]["model"]["grid"]:
        if entry["class_path"].endswith("Dsr"):
            return dict(entry["init_args"]), dict(entry["trainer"])
    msg = "The config has no anomalib_dsr.Dsr model."
    raise ValueError(msg)


class ValidationCurve(LearningCurve):
    """A learning curve of validation image AUROC, one figure per score window in :data:`WINDOWS`.

    ``inputs`` are the validation images already through the model's pre-processing, ``(N, 3, H, W)``.
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, points: int) -> None:
        super().__init__(points)
        self.inputs, self.labels = inputs, labels

    @torch.no_grad()
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        pl_module.eval()
        anomaly = torch.cat([pl_module.model.detect(batch)[2][:, 1:] for batch in self.inputs.split(16)])
        pl_module.train()  # DsrModel.train keeps the VQ-VAE in eval mode
        return {f"w={w}": float(binary_auroc(window_max(anomaly, (w, w)), self.labels)) for w in WINDOWS}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("anomalib_dsr.evaluation.learning_curve").setLevel(logging.INFO)  # one line per evaluation
    config = yaml.safe_load(args.config.read_text())
    root = prepare_elpv(**config["elpv_dataset"]) / args.cell
    init_args, trainer = dsr_settings(config)
    init_args.update({name: yaml.safe_load(value) for name, value in (item.split("=", 1) for item in args.set)})

    datamodule = Folder(
        name=f"elpv_{args.cell}",
        root=root,
        normal_dir="train/good",
        normal_test_dir="val/good",
        abnormal_dir="val/defect",
        val_split_mode="none",
        train_batch_size=8,
        num_workers=0,
    )
    datamodule.setup()
    batches = list(datamodule.test_dataloader())
    labels = torch.cat([b.gt_label for b in batches]).int()
    print(
        f"{args.cell}: {int((labels == 0).sum())} good and {int(labels.sum())} defective validation cells; "
        f"Dsr({init_args})"
    )

    seed_everything(args.seed)
    model = Dsr(image_size=config["benchmark"]["image_size"], **init_args)
    curve = ValidationCurve(
        model.pre_processor.transform(torch.cat([b.image for b in batches])), labels, args.evaluations
    )
    with TemporaryDirectory() as temp_dir:
        engine = Engine(
            accelerator="cpu",
            devices=1,
            logger=False,
            default_root_dir=temp_dir,
            max_steps=args.max_steps or trainer["max_steps"],
            limit_val_batches=0,
            enable_progress_bar=False,
            callbacks=[curve],
        )
        engine.fit(model, datamodule)
    print(" step train_s  " + "  ".join(f"{f'w={w}':<5}" for w in WINDOWS))
    for row in curve.rows:
        print(f"{row['step']:>5} {row['train_seconds']:>7.0f}  " + "  ".join(f"{row[f'w={w}']:.3f}" for w in WINDOWS))


if __name__ == "__main__":
    main()
