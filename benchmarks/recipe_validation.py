"""Choose a DSR recipe on validation splits only: several seeds each, at equal training wall time, mean and spread.

Validation sets (never a test set; MVTec AD ``bottle`` is test-only):

- KolektorSDD's validation commutators, ``--kolektor OUT`` after ``anomalib-dsr prepare-kolektor SRC OUT
  --val-share 0.3`` (category ``kolektor_val``: whole commutators that ``kolektor/test`` never shows);
- ELPV's validation cells, ``--elpv ROOT`` (``prepare_elpv(ROOT, max_test_per_class=100)`` as in
  ``configs/benchmark/elpv.yaml`` puts the cells beyond the test cap into ``<type>/val``), ``--elpv-cell poly``;
- the demo generator with seeds other than the demo's 0, ``--demo-seeds 1 2 3`` (built offline in ``--output``).

A recipe is a config such as ``configs/dsr_cpu.yaml`` (its ``model.init_args``, batch size and ``trainer.max_steps``)
with ``--set NAME=VALUE`` overrides of ``Dsr``'s arguments. ``--minutes M`` gives every run the same training wall
time on this CPU (the steps are calibrated once from a timed run of a few steps), ``--steps N`` the same steps;
default: the config's steps. Each run reports image AUROC, pixel AP (where the set has masks) and the image AUROC of
the score taken from the final anomaly map (``map image AUROC``) on the validation images at ``--points`` evenly
spaced steps; the table shows the last, and with ``--curve`` every point. Rows go to ``--output``/rows.csv too.

    .venv/bin/python benchmarks/recipe_validation.py --config configs/dsr_cpu.yaml --kolektor datasets \\
        --demo-seeds 1 2 3 --seeds 0 1 2 --minutes 30 --set decoder_bottleneck=32
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, seed_everything

from common import cpu_name

CALIBRATION_STEPS = 9  # 6 phase-2 and 3 phase-3 steps at the paper's 2:1; the first 3 warm up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/dsr_cpu.yaml"), help="the recipe")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a Dsr argument")
    parser.add_argument("--kolektor", type=Path, help="root holding kolektor_val (prepare-kolektor --val-share)")
    parser.add_argument("--elpv", type=Path, help="ELPV root laid out by prepare_elpv with max_test_per_class")
    parser.add_argument("--elpv-cell", choices=("mono", "poly"), default="poly")
    parser.add_argument("--demo-seeds", type=int, nargs="*", default=[], help="demo generator seeds (not 0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (at least 3)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="training wall time of every run, steps calibrated here")
    budget.add_argument("--steps", type=int, help="training steps of every run")
    parser.add_argument("--points", type=int, default=3, help="evaluations per run, evenly spaced (default 3)")
    parser.add_argument("--curve", action="store_true", help="print every evaluation, not only the last")
    parser.add_argument("--output", type=Path, default=Path("results/recipe_validation"), help="working folder")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) < 3:
        parser.error(f"--seeds: at least 3 different seeds (single runs swing by 5-10 points), got {args.seeds}")
    if 0 in args.demo_seeds:
        parser.error("--demo-seeds: 0 is the demo's own dataset; choose recipes on the generator's other seeds")
    if not (args.kolektor or args.elpv or args.demo_seeds):
        parser.error("give at least one validation set: --kolektor, --elpv or --demo-seeds")
    return args


def recipe(args: argparse.Namespace) -> tuple[dict[str, Any], int, int]:
    """``Dsr``'s arguments (the config's, overridden by ``--set``), the batch size and the config's steps."""
    config = yaml.safe_load(args.config.read_text())
    init_args = dict(config["model"]["init_args"])
    for item in args.set:
        name, _, value = item.partition("=")
        if not value:
            msg = f"--set {item!r}: write NAME=VALUE, e.g. --set decoder_bottleneck=32"
            raise SystemExit(msg)
        init_args[name] = yaml.safe_load(value)
    return init_args, int(config["data"]["init_args"]["train_batch_size"]), int(config["trainer"]["max_steps"])


def validation_sets(args: argparse.Namespace, batch_size: int, image_size: int) -> dict[str, Callable[[], Any]]:
    """Datamodule factories by name, each testing on validation images only."""
    from anomalib.data import Folder, MVTecAD

    from anomalib_dsr.data.demo_data import make_demo_dataset
    from anomalib_dsr.data.kolektor import VAL_CATEGORY

    loaders = {"train_batch_size": batch_size, "eval_batch_size": batch_size, "num_workers": 0}
    sets: dict[str, Callable[[], Any]] = {}
    if args.kolektor:
        if not (args.kolektor / VAL_CATEGORY / "test").is_dir():
            msg = (
                f"{args.kolektor / VAL_CATEGORY} is missing: run anomalib-dsr prepare-kolektor SRC OUT --val-share 0.3"
            )
            raise SystemExit(msg)
        sets["KolektorSDD val"] = lambda: MVTecAD(root=args.kolektor, category=VAL_CATEGORY, **loaders)
    if args.elpv:
        cell = args.elpv / args.elpv_cell
        if not (cell / "val").is_dir():
            msg = f"{cell / 'val'} is missing: lay ELPV out with prepare_elpv(root, max_test_per_class=100)"
            raise SystemExit(msg)
        sets[f"ELPV {args.elpv_cell} val"] = lambda: Folder(
            name=f"elpv_{args.elpv_cell}_val", root=cell, normal_dir="train/good", normal_test_dir="val/good",
            abnormal_dir="val/defect", val_split_mode="none", **loaders,
        )  # fmt: skip
    for seed in args.demo_seeds:
        root = args.output / f"demo_seed{seed}"
        make_demo_dataset(root, image_size=image_size, seed=seed)
        sets[f"demo seed {seed}"] = lambda root=root: MVTecAD(root=root, category="gravel", **loaders)
    return sets


class StepTimes(Callback):
    """The wall-clock time at the end of every training step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter())


def train(init_args: dict[str, Any], datamodule: Any, steps: int, seed: int, callbacks: list, root: Path) -> float:
    """Fit ``Dsr(**init_args)`` for ``steps`` from ``seed``; returns the training wall time in seconds."""
    from anomalib.engine import Engine

    from anomalib_dsr import Dsr

    seed_everything(seed, workers=True)
    model = Dsr(**init_args)
    engine = Engine(
        accelerator="cpu", devices=1, logger=False, default_root_dir=root, max_steps=steps, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    start = time.perf_counter()
    engine.fit(model, datamodule)
    return time.perf_counter() - start


def seconds_per_step(init_args: dict[str, Any], datamodule: Any, root: Path) -> float:
    """This CPU's seconds per training step of the recipe (both phases), from a short run after warm-up."""
    times = StepTimes()
    train(init_args, datamodule, CALIBRATION_STEPS, 0, [times], root)
    return (times.times[-1] - times.times[2]) / (len(times.times) - 3)


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """``rows`` as a CSV file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def spread(values: list[float]) -> str:
    """Mean ± standard deviation of ``values`` (NaN where there are none)."""
    values = [value for value in values if value == value]
    if not values:
        return "—"
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {deviation:.3f}"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the recipe on every validation set and seed; print the table; return one row per run and evaluation."""
    from anomalib_dsr.evaluation.learning_curve import LearningCurve

    args = parse_args(argv)
    init_args, batch_size, config_steps = recipe(args)
    size = init_args.get("image_size", 256)
    sets = validation_sets(args, batch_size, size if isinstance(size, int) else size[0])
    steps = args.steps or config_steps
    if args.minutes:
        per_step = seconds_per_step(init_args, next(iter(sets.values()))(), args.output / "calibration")
        steps = max(2, round(args.minutes * 60 / per_step))
        print(f"{per_step:.2f} s a step on this CPU: {steps} steps in {args.minutes:g} minutes")
    rows = []
    for name, make in sets.items():
        for seed in args.seeds:
            curve = LearningCurve(args.points)
            seconds = train(init_args, make(), steps, seed, [curve], args.output / "runs")
            rows += [{"set": name, "seed": seed, "fit_seconds": seconds, **row} for row in curve.rows]
            write_rows(rows, args.output / "rows.csv")  # after every run: an interrupted comparison keeps its runs

    print(f"\nDsr({init_args}), {steps} steps, seeds {args.seeds}, {torch.get_num_threads()} threads, {cpu_name()}")
    print("| validation set | step | train min | image AUROC | pixel AP | per seed (image AUROC) | map image AUROC |")
    print("|---|---:|---:|---|---|---|---|")
    for name in sets:
        runs = [row for row in rows if row["set"] == name]
        for step in sorted({row["step"] for row in runs}) if args.curve else [max(row["step"] for row in runs)]:
            at = [row for row in runs if row["step"] == step]
            minutes = statistics.fmean(row["train_seconds"] for row in at) / 60
            auroc, pixel_ap, map_auroc = (
                [row.get(key, float("nan")) for row in at] for key in ("image_AUROC", "pixel_AP", "map_image_AUROC")
            )
            seeds = ", ".join(f"{value:.3f}" for value in auroc)
            print(
                f"| {name} | {step} | {minutes:.1f} | {spread(auroc)} | {spread(pixel_ap)} | {seeds} "
                f"| {spread(map_auroc)} |"
            )
    return rows


if __name__ == "__main__":
    main()
