"""Choose PatchCore's offline backbone, feature layers and coreset ratio on validation draws, never on a test set.

The demo benchmark uses ``make_demo_dataset(seed=0)``. Here other seeds (default 1 and 2) give independent draws of
the same generator and sizes (80 train, 16 good + 24 defective test images, 128 px). For each candidate PatchCore is
built as the benchmark builds it (``build_model``: offline ImageNet weights, the backbone's normalisation), its
features are collected once per draw, and each coreset ratio subsamples them; the draw's test images give image
AUROC and pixel AP. The printed table is what ``configs/benchmark/*.yaml`` cite.

Usage (from the repository root, a few minutes on 2 cores; the largest ratios dominate):

    .venv/bin/python benchmarks/patchcore_validation.py
    .venv/bin/python benchmarks/patchcore_validation.py --seeds 3 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from anomalib.data import MVTecAD

from anomalib_dsr.data.demo_data import make_demo_dataset
from anomalib_dsr.evaluation.learning_curve import evaluate
from anomalib_dsr.workflows.benchmark import build_model

from common import demo_datamodule

# (backbone, feature layers, coreset ratios). Stride-4 features (blocks.1) give 1,024 patches per 128-px image, so
# their coreset selection takes minutes: only small ratios there.
CANDIDATES = (
    ("tf_efficientnet_lite0", ("blocks.2", "blocks.4"), (0.01, 0.05, 0.1, 0.25)),
    ("tf_efficientnet_lite0", ("blocks.2",), (0.01, 0.1)),
    ("tf_efficientnet_lite0", ("blocks.1", "blocks.2"), (0.01, 0.025)),
    ("tf_efficientnet_lite0", ("blocks.2", "blocks.4", "blocks.6"), (0.1,)),
    ("tf_efficientnet_lite2", ("blocks.2", "blocks.4"), (0.01, 0.1)),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2], help="demo-dataset draws (0 is the benchmark's)"
    )
    parser.add_argument("--image-size", type=int, default=128)
    return parser.parse_args()


def validation_draws(root: Path, seeds: list[int], image_size: int) -> dict[int, MVTecAD]:
    """One demo-dataset draw per seed, set up as the benchmark's datamodule."""
    if 0 in seeds:
        msg = "seed 0 draws the benchmark's own test set; choose other seeds"
        raise ValueError(msg)
    draws = {}
    for seed in seeds:
        make_demo_dataset(root / f"seed{seed}", image_size=image_size, seed=seed)
        datamodule = demo_datamodule(root / f"seed{seed}")
        datamodule.setup()
        draws[seed] = datamodule
    return draws


@torch.no_grad()
def collect_features(model, datamodule: MVTecAD) -> list[torch.Tensor]:
    """PatchCore's embedding store after one pass over the training images (what ``fit`` collects)."""
    model.model.train()
    model.model.embedding_store.clear()
    for batch in datamodule.train_dataloader():
        model.model(model.pre_processor.transform(batch.image))
    return list(model.model.embedding_store)


def main() -> None:
    args = parse_args()
    with TemporaryDirectory() as root:
        draws = validation_draws(Path(root), args.seeds, args.image_size)
        seeds = " | ".join(f"seed {seed} image AUROC | seed {seed} pixel AP" for seed in draws)
        print(f"backbone | layers | coreset | {seeds} | mean image AUROC | mean pixel AP | fit s (first draw)")
        for backbone, layers, ratios in CANDIDATES:
            entry = {"class_path": "Patchcore", "init_args": {"backbone": backbone, "layers": list(layers)}}
            model = build_model(entry, image_size=args.image_size)
            stores, seconds = {}, {}
            for seed, datamodule in draws.items():
                start = time.perf_counter()
                stores[seed] = collect_features(model, datamodule)
                seconds[seed] = time.perf_counter() - start
            for ratio in ratios:
                cells, fit_seconds = [], None
                for seed, datamodule in draws.items():
                    start = time.perf_counter()
                    model.model.embedding_store = list(stores[seed])
                    model.model.subsample_embedding(ratio)
                    fit_seconds = fit_seconds or seconds[seed] + time.perf_counter() - start
                    row = evaluate(model, datamodule.test_dataloader())
                    cells.append((100 * row["image_AUROC"], 100 * row["pixel_AP"]))
                means = [sum(cell[i] for cell in cells) / len(cells) for i in (0, 1)]
                figures = " | ".join(f"{auroc:.1f} | {ap:.1f}" for auroc, ap in cells)
                print(
                    f"{backbone} | {'+'.join(layers)} | {ratio} | {figures} | {means[0]:.1f} | {means[1]:.1f} "
                    f"| {fit_seconds:.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
