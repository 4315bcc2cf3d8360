"""``anomalib-dsr benchmark``: DSR beside anomalib's PatchCore and DRAEM, through anomalib's own Benchmark pipeline.

anomalib 2.7's :class:`~anomalib.pipelines.Benchmark` (config file, ``grid`` syntax, serial or one-job-per-GPU
runners, results CSV) runs as is. What it lacks for this comparison is added here:

- models outside ``anomalib.models`` (``anomalib_dsr.Dsr``), which anomalib's ``get_model`` refuses;
- a training budget per model (``trainer: {max_steps: ...}`` beside ``class_path``); anomalib's job sets none,
  so Lightning's default of 1000 epochs would apply;
- one evaluator for every model (image AUROC, pixel AUROC, pixel AP) and the test throughput in images/s;
- offline inputs: PatchCore is recorded as skipped, with the reason, when its ImageNet backbone weights are
  neither in the local cache nor given as a file (``backbone_weights``); DRAEM gets a local texture folder
  instead of downloading DTD; the demo dataset, the ELPV solar-cell dataset (from its pip package) and a
  general VQ-VAE for DSR (from the photographs installed packages ship) are built when missing;
- per-job progress lines (anomalib hides each job's output) and a learning curve per model (image AUROC and
  pixel AP against training wall time);
- a markdown report and PNG charts beside anomalib's ``results.csv``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import sys
import time
from argparse import Namespace
from collections.abc import Generator
from datetime import datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from anomalib.data import get_datamodule
from anomalib.engine import Engine
from anomalib.models import AnomalibModule
from anomalib.pipelines import Benchmark
from anomalib.pipelines.benchmark.generator import BenchmarkJobGenerator
from anomalib.pipelines.benchmark.job import BenchmarkJob
from anomalib.pipelines.components import Job, Runner
from anomalib.pipelines.components.utils import get_iterator_from_grid_dict
from anomalib.pipelines.types import PREV_STAGE_RESULT
from anomalib.utils.config import flatten_dict
from anomalib.utils.logging import hide_output
from lightning.pytorch import Callback, seed_everything
from PIL import Image

from anomalib_dsr.workflows.demo_data import make_demo_dataset
from anomalib_dsr.workflows.elpv import prepare_elpv
from anomalib_dsr.model.general_images import general_photos, photo_names
from anomalib_dsr.workflows.learning_curve import LearningCurve, save_curve_chart
from anomalib_dsr.model.lightning_model import Dsr
from anomalib_dsr.workflows.paper_table import PAPER_IMAGE_AUROC
from anomalib_dsr.model.pretraining import pretrain_vq

logger = logging.getLogger(__name__)

# Where model classes may come from (anomalib's own whitelist, plus this package).
MODEL_MODULES = ("anomalib.models", "anomalib_dsr")
# Keys of a model entry beside anomalib's class_path / init_args.
RUNNER_KEYS = ("trainer", "backbone_weights", "pretrain_vq", "curve_points")
TEXTURE_MARKER = "TEXTURES_FROM_SCIKIT_IMAGE.txt"
# Report columns: (heading, results.csv column, scale).
REPORT_METRICS = (
    ("image AUROC", "image_AUROC", 100.0),
    ("pixel AP", "pixel_AUPR", 100.0),
    ("pixel AUROC", "pixel_AUROC", 100.0),
    ("train s", "fit_duration", 1.0),
    ("img/s", "images_per_second", 1.0),
)


class BenchmarkConfigError(ValueError):
    """The benchmark config names something that cannot run; the message says what and what would be valid."""


def model_class(class_path: str) -> type[AnomalibModule]:
    """``Patchcore``, ``anomalib.models.Draem`` or ``anomalib_dsr.Dsr`` → the class (nothing else is imported)."""
    module_path, _, name = class_path.rpartition(".")
    module_path = module_path or "anomalib.models"
    if not any(module_path == allowed or module_path.startswith(allowed + ".") for allowed in MODEL_MODULES):
        msg = f"model class_path {class_path!r}: only models from {' or '.join(MODEL_MODULES)} can be benchmarked."
        raise BenchmarkConfigError(msg)
    cls = getattr(importlib.import_module(module_path), name, None)
    if not (inspect.isclass(cls) and issubclass(cls, AnomalibModule)):
        msg = f"model class_path {class_path!r}: {module_path} has no anomalib model named {name!r}."
        raise BenchmarkConfigError(msg)
    return cls


def check_config(config: dict) -> None:
    """Refuse, before anything runs, unsupported accelerators, models that cannot be built and models without a
    training budget."""
    accelerators = config["accelerator"] if isinstance(config["accelerator"], list) else [config["accelerator"]]
    for accelerator in accelerators:
        if accelerator not in {"cpu", "cuda"}:
            msg = f"accelerator {accelerator!r}: use cpu or cuda (anomalib's benchmark pipeline)."
            raise BenchmarkConfigError(msg)
    models = config.get("benchmark", {}).get("model", {})
    for entry in models.get("grid", [models]):
        cls = model_class(entry.get("class_path", ""))
        unknown = set(entry) - {"class_path", "init_args", *RUNNER_KEYS}
        if unknown:
            msg = f"model {cls.__name__}: unknown keys {sorted(unknown)}; valid: class_path, init_args, {', '.join(RUNNER_KEYS)}."
            raise BenchmarkConfigError(msg)
        if "pretrain_vq" in entry and not (entry.get("init_args") or {}).get("vq_weights"):
            msg = f"model {cls.__name__}: 'pretrain_vq' needs 'init_args: {{vq_weights: PATH}}', the file it writes."
            raise BenchmarkConfigError(msg)
        budget = entry.get("trainer", {})
        if "max_steps" not in budget and "max_epochs" not in budget:
            msg = f"model {cls.__name__}: set a training budget, e.g. 'trainer: {{max_steps: 1000}}' or 'max_epochs'."
            raise BenchmarkConfigError(msg)


def build_model(model_config: dict, image_size: int | None) -> AnomalibModule:
    """The model with the benchmark's shared evaluator, no visualiser, and the benchmark's image size."""
    cls = model_class(model_config["class_path"])
    kwargs = dict(model_config.get("init_args") or {})
    kwargs.update(evaluator=Dsr.configure_evaluator(), visualizer=False)
    if image_size is not None:
        if "image_size" in inspect.signature(cls).parameters:
            kwargs["image_size"] = image_size
        else:
            kwargs["pre_processor"] = cls.configure_pre_processor(image_size=(image_size, image_size))
    if model_config.get("backbone_weights"):
        kwargs["pre_trained"] = False
    model = cls(**kwargs)
    if model_config.get("backbone_weights"):
        load_backbone_weights(model, Path(model_config["backbone_weights"]))
    return model


def load_backbone_weights(model: AnomalibModule, path: Path) -> None:
    """Load a local ImageNet checkpoint (.pth/.pt/.bin or .safetensors) into the model's timm feature extractor."""
    extractor = getattr(getattr(model, "model", None), "feature_extractor", None)
    backbone = getattr(extractor, "feature_extractor", None)
    if backbone is None:
        msg = f"backbone_weights {path}: {type(model).__name__} has no timm feature extractor to load them into."
        raise BenchmarkConfigError(msg)
    if not path.is_file():
        msg = f"backbone_weights {path}: no such file."
        raise BenchmarkConfigError(msg)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing = backbone.load_state_dict(state, strict=False).missing_keys
    if missing:
        msg = f"backbone_weights {path}: not weights of {extractor.backbone}; missing e.g. {missing[:3]}."
        raise BenchmarkConfigError(msg)


def missing_backbone_reason(model_config: dict) -> str | None:
    """Why the model cannot run offline (its pretrained backbone is not on this machine), or ``None``."""
    cls = model_class(model_config["class_path"])
    parameters = inspect.signature(cls).parameters
    if "backbone" not in parameters or "pre_trained" not in parameters or model_config.get("backbone_weights"):
        return None
    init_args = model_config.get("init_args") or {}
    if not init_args.get("pre_trained", parameters["pre_trained"].default):
        return None
    backbone = init_args.get("backbone", parameters["backbone"].default)
    if backbone_in_cache(backbone):
        return None
    return (
        f"ImageNet weights of {backbone} are not in the local timm/Hugging Face cache and are not downloaded "
        f"without asking. Give a file with 'backbone_weights: PATH', or fetch them once online: "
        f"python -c \"import timm; timm.create_model('{backbone}', pretrained=True)\""
    )


def backbone_in_cache(backbone: str) -> bool:
    """Whether timm would find ``backbone``'s pretrained weights without downloading."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    config = timm.models.get_pretrained_cfg(backbone)
    if config is None:
        return False
    if config.hf_hub_id:
        for file_name in ("model.safetensors", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(config.hf_hub_id, file_name), str):
                return True
    return bool(config.url) and (Path(torch.hub.get_dir()) / "checkpoints" / Path(config.url).name).is_file()


def make_texture_folder(folder: Path, tile: int = 256) -> int:
    """Fill ``folder`` with texture tiles cut from the photographs installed packages ship (DRAEM's offline
    stand-in for DTD; none of them is in the demo dataset); returns how many. A marker file says so."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, photo in zip(photo_names(), general_photos(), strict=True):
        name = name.replace(":", "_").split(".")[0]
        for top in range(0, photo.shape[0] - tile + 1, tile):
            for left in range(0, photo.shape[1] - tile + 1, tile):
                Image.fromarray(photo[top : top + tile, left : left + tile]).save(folder / f"{name}_{top}_{left}.png")
                count += 1
    (folder / TEXTURE_MARKER).write_text(f"{count} tiles of {tile}x{tile} from photographs packages ship, not DTD.\n")
    return count


def has_images(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in {".png", ".jpg", ".jpeg"} for p in folder.rglob("*"))


def prepare_offline_inputs(config: dict) -> list[str]:
    """Build what the config needs and this machine lacks; returns notes for the report."""
    notes = []
    demo = config.get("demo_dataset")
    if demo:
        folder = make_demo_dataset(**demo)
        notes.append(f"Dataset: the offline demo dataset ({folder}), built from scikit-image photographs.")
    if elpv := config.get("elpv_dataset"):
        folder = prepare_elpv(**elpv)
        notes.append(f"Dataset: ELPV solar cells (pip package elpv-dataset, CC BY-NC-SA 4.0) laid out in {folder}.")
    models = config["benchmark"]["model"]
    for entry in models.get("grid", [models]):
        init_args = entry.get("init_args") or {}
        if "pretrain_vq" in entry and not Path(init_args["vq_weights"]).is_file():
            start = time.perf_counter()
            widths = {k: init_args[k] for k in ("channels", "res_hidden", "num_embeddings", "embedding_dim") if k in init_args}
            recipe = {"images": None, "general": not entry["pretrain_vq"].get("images"), **entry["pretrain_vq"]}
            pretrain_vq(output=init_args["vq_weights"], resume=False, **recipe, **widths)
            source = "the photographs installed packages ship" if recipe["general"] else ", ".join(map(str, recipe["images"]))
            seconds = time.perf_counter() - start
            notes.append(f"DSR: general VQ-VAE pretrained on {source} in {seconds:.0f} s (not counted in 'train s').")
        if "dtd_dir" in inspect.signature(model_class(entry["class_path"])).parameters:
            textures = Path(init_args.get("dtd_dir", "./datasets/dtd"))
            if not has_images(textures):
                count = make_texture_folder(textures)
                logger.info("DRAEM: %d texture tiles written to %s (DTD is not downloaded)", count, textures)
            if (textures / TEXTURE_MARKER).is_file():
                notes.append(f"DRAEM: anomaly textures are tiles of photographs that installed packages ship ({textures}), not DTD.")
    return notes


class ThroughputTimer(Callback):
    """Test images per second of the model's step (pre-processing, forward, post-processing; not metrics)."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._start = 0.0

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.seconds += time.perf_counter() - self._start
        self.images += len(batch.image)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else math.nan


class JobProgress(Callback):
    """One line per tenth of a job's training steps (model, dataset, step / total, elapsed) on the terminal's
    stderr, which anomalib's ``hide_output`` leaves alone."""

    def __init__(self, label: str, lines: int = 10) -> None:
        self.label = label
        self.lines = lines
        self._start = 0.0
        self._every = 1

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._every = max(1, math.ceil(trainer.estimated_stepping_batches / self.lines))
        self._print(f"training, {int(trainer.estimated_stepping_batches)} steps")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, int(trainer.estimated_stepping_batches)
        if step % self._every == 0 or step == total:
            self._print(f"step {step}/{total}, {time.perf_counter() - self._start:.0f} s")

    def on_test_start(self, trainer, pl_module) -> None:
        self._print("testing")

    def _print(self, message: str) -> None:
        print(f"[benchmark] {self.label}: {message}", file=sys.__stderr__, flush=True)


class BudgetedBenchmarkJob(BenchmarkJob):
    """anomalib's benchmark job with the model's training budget, test throughput, a learning curve, progress
    lines, and errors kept as rows."""

    def __init__(
        self, accelerator: str, model: AnomalibModule, datamodule, seed: int, flat_cfg: dict, trainer: dict, curve_points: int = 5
    ) -> None:
        super().__init__(accelerator=accelerator, model=model, datamodule=datamodule, seed=seed, flat_cfg=flat_cfg)
        self.trainer = trainer
        self.curve_points = curve_points

    @hide_output
    def run(self, task_id: int | None = None) -> dict[str, Any]:
        """Train within the budget, test; returns the results row (``status`` ``failed`` with the reason on error)."""
        row = {"accelerator": self.accelerator, "model": type(self.model).__name__, **self.flat_cfg}
        timer = ThroughputTimer()
        curve = LearningCurve(self.curve_points)
        progress = JobProgress(f"{row['model']} on {with_category(pd.DataFrame([row]))['category'].iloc[0]}")
        try:
            with TemporaryDirectory() as temp_dir:
                seed_everything(self.seed)
                engine = Engine(
                    accelerator=self.accelerator,
                    devices="auto" if task_id is None else [task_id],
                    default_root_dir=temp_dir,
                    logger=False,
                    callbacks=[timer, curve, progress],
                    **self.trainer,
                )
                start = time.perf_counter()
                engine.fit(self.model, self.datamodule)
                fitted = time.perf_counter()
                metrics = engine.test(self.model, self.datamodule, verbose=False)[0]
                tested = time.perf_counter()
        except Exception as error:  # noqa: BLE001 - one failed model must not hide the others' results
            logger.exception("Benchmark job %s failed", row["model"])
            return {**row, "status": "failed", "reason": f"{type(error).__name__}: {error}"}
        durations = {"fit_duration": fitted - start, "test_duration": tested - fitted}
        curve_json = json.dumps(curve.rows)
        return {**row, "status": "ok", **durations, "images_per_second": timer.images_per_second, "learning_curve": curve_json, **metrics}

    @staticmethod
    def collect(results: list[dict[str, Any]]) -> pd.DataFrame:
        """Rows may differ in columns (skipped and failed jobs have no metrics)."""
        return pd.DataFrame(results)

    @staticmethod
    def save(result: pd.DataFrame) -> None:
        """anomalib's ``runs/benchmark/<time>/results.csv``, plus ``report.md``, ``chart.png`` and
        ``learning_curves.png`` beside it."""
        folder = Path("runs") / BenchmarkJob.name / datetime.now().strftime("%Y-%m-%d-%H_%M_%S")
        folder.mkdir(parents=True, exist_ok=True)
        result.to_csv(folder / "results.csv", index=False)
        (folder / "report.md").write_text(markdown_report(result, BenchmarkRun.notes))
        save_chart(result, folder / "chart.png")
        ok = with_category(result).query("status == 'ok'")
        curves = {f"{r.model} ({r.category})": json.loads(r.learning_curve) for r in ok.itertuples() if r.learning_curve != "[]"}
        if curves:
            save_curve_chart(curves, folder / "learning_curves.png")
        BenchmarkRun.folder = folder
        print(f"Benchmark results in {folder}: results.csv, report.md, chart.png, learning_curves.png")


class SkippedJob(Job):
    """A model that cannot run here; its row says why (collected and saved by :class:`BudgetedBenchmarkJob`)."""

    def __init__(self, accelerator: str, flat_cfg: dict, model: str, reason: str) -> None:
        super().__init__()
        self.row = {"accelerator": accelerator, "model": model, **flat_cfg, "status": "skipped", "reason": reason}

    def run(self, task_id: int | None = None) -> dict[str, Any]:
        return dict(self.row)

    collect = staticmethod(BudgetedBenchmarkJob.collect)
    save = staticmethod(BudgetedBenchmarkJob.save)


class BudgetedJobGenerator(BenchmarkJobGenerator):
    """anomalib's grid over models and datasets, building models from anywhere in :data:`MODEL_MODULES`."""

    @property
    def job_class(self) -> type:
        return BudgetedBenchmarkJob

    def generate_jobs(self, args: dict, previous_stage_result: PREV_STAGE_RESULT) -> Generator[Job, None, None]:
        del previous_stage_result
        for container in get_iterator_from_grid_dict(args):
            flat_cfg = flatten_dict(container)
            model_config = container["model"]
            reason = missing_backbone_reason(model_config)
            if reason is not None:
                yield SkippedJob(self.accelerator, flat_cfg, model_class(model_config["class_path"]).__name__, reason)
                continue
            seed_everything(container["seed"])  # the models' initial weights too
            yield BudgetedBenchmarkJob(
                accelerator=self.accelerator,
                model=build_model(model_config, container.get("image_size")),
                datamodule=get_datamodule(container["data"]),
                seed=container["seed"],
                flat_cfg=flat_cfg,
                trainer=dict(model_config["trainer"]),
                curve_points=model_config.get("curve_points", 5),
            )


class BenchmarkRun(Benchmark):
    """anomalib's Benchmark pipeline with :class:`BudgetedJobGenerator` in its runners."""

    notes: list[str] = []  # report notes of the current run (the runners' save() is a static method)
    folder: Path | None = None  # where save() wrote the current run's files

    @staticmethod
    def _setup_runners(args: dict) -> list[Runner]:
        """anomalib's runners (serial, or one job per GPU), each given :class:`BudgetedJobGenerator`."""
        runners = Benchmark._setup_runners(args)
        for runner in runners:
            runner.generator = BudgetedJobGenerator(runner.generator.accelerator)
        return runners


def run_benchmark(config_path: str | Path) -> Path:
    """Check the config, prepare offline inputs, run the pipeline; returns the folder of CSV, report and chart."""
    config_path = Path(config_path)
    if not config_path.is_file():
        msg = f"benchmark config {config_path}: no such file (see configs/benchmark/)."
        raise BenchmarkConfigError(msg)
    config = yaml.safe_load(config_path.read_text())
    if not isinstance(config, dict) or "benchmark" not in config or "accelerator" not in config:
        msg = f"benchmark config {config_path}: needs top-level 'accelerator' and 'benchmark' keys (anomalib's layout)."
        raise BenchmarkConfigError(msg)
    check_config(config)
    BenchmarkRun.notes = prepare_offline_inputs(config)
    BenchmarkRun.folder = None
    BenchmarkRun().run(Namespace(config=config_path))
    if BenchmarkRun.folder is None:
        msg = "the benchmark pipeline stopped before writing results; see runs/pipeline.log"
        raise RuntimeError(msg)
    return BenchmarkRun.folder


def with_category(result: pd.DataFrame) -> pd.DataFrame:
    """``category``: the datamodule's category (MVTec-like) or name (``Folder``)."""
    for key in ("data.init_args.category", "data.init_args.name"):
        if key in result:
            return result.assign(category=result[key].fillna("–"))
    return result.assign(category="–")


def markdown_report(result: pd.DataFrame, notes: list[str]) -> str:
    """One table per dataset: rows are categories and their mean, columns the metrics of each model."""
    lines = ["# Benchmark: DSR, PatchCore, DRAEM", ""]
    result = with_category(result)
    ok = result[result["status"] == "ok"]
    dataset_key = "data.class_path"
    for dataset, rows in ok.groupby(dataset_key):
        models = list(dict.fromkeys(rows["model"]))
        categories = sorted(rows["category"].unique())
        paper = dataset.rpartition(".")[2] == "MVTecAD" and "Dsr" in models and bool(set(categories) & set(PAPER_IMAGE_AUROC))
        metrics = measured_metrics(rows)  # e.g. no pixel metrics on a dataset without masks
        header = [f"{model} {heading}" for model in models for heading, _, _ in metrics]
        if paper:
            header += ["Dsr image AUROC, paper", "difference"]
        lines += [f"## {dataset.rpartition('.')[2]}", "", "| category | " + " | ".join(header) + " |"]
        lines.append("|---" * (len(header) + 1) + "|")
        table = {}
        for category in categories:
            cells = []
            for model in models:
                match = rows[(rows["model"] == model) & (rows["category"] == category)]
                cells += [float(match[column].mean()) * scale if len(match) else math.nan for _, column, scale in metrics]
            if paper:
                ours = cells[header.index("Dsr image AUROC")]
                cells += [PAPER_IMAGE_AUROC.get(category, math.nan), ours - PAPER_IMAGE_AUROC.get(category, math.nan)]
            table[category] = cells
        table["mean"] = list(np.nanmean(np.array(list(table.values())), axis=0)) if len(table) > 1 else None
        for category, cells in table.items():
            if cells is not None:
                lines.append(f"| {category} | " + " | ".join(_cell(value) for value in cells) + " |")
        lines.append("")
    for _, row in result[result["status"] != "ok"].iterrows():
        lines.append(f"- **{row['model']}** ({row['category']}): {row['status']} — {row['reason']}")
    lines += [f"- {note}" for note in notes]
    lines += [
        "",
        "Columns: image AUROC and pixel AUROC in %; pixel AP = average precision of the anomaly map's pixels (%);",
        "train s = wall time of training (fit); img/s = test images per second through the model's step",
        "(pre-processing, forward, post-processing). Metrics are anomalib's, computed on the full test images.",
        "",
    ]
    return "\n".join(lines)


def measured_metrics(rows: pd.DataFrame) -> list[tuple[str, str, float]]:
    """The entries of ``REPORT_METRICS`` that at least one of ``rows`` has a value for."""
    return [metric for metric in REPORT_METRICS if metric[1] in rows and rows[metric[1]].notna().any()]


def _cell(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def save_chart(result: pd.DataFrame, path: Path) -> None:
    """Grouped bars: image AUROC and pixel AP per category (all datasets) and model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ok = with_category(result).query("status == 'ok'")
    measured = measured_metrics(ok)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for axis, (heading, column, scale) in zip(axes, REPORT_METRICS[:2], strict=False):
        if (heading, column, scale) in measured:
            table = ok.pivot_table(index="category", columns="model", values=column) * scale
            table.plot.bar(ax=axis, rot=0)
        axis.set_title(heading + " (%)")
        axis.set_xlabel("")
        axis.set_ylim(0, 100)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
