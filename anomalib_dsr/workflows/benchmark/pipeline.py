"""anomalib 2.7's :class:`~anomalib.pipelines.Benchmark` pipeline, with what this comparison adds to it.

The pipeline (config file, ``grid`` syntax, serial or one-job-per-GPU runners, results CSV) runs as is. Its jobs here
build models from anywhere in :data:`~anomalib_dsr.workflows.benchmark.config.MODEL_MODULES`, train each within its
own budget (``trainer`` beside ``class_path``), test with one evaluator for every model (image AUROC, pixel AUROC,
pixel AP) and measure the test throughput; they record a learning curve per model (image AUROC and pixel AP
against training wall time; one point, after fitting, for models without training steps: PatchCore), print
progress lines, and keep skipped and failed models as rows with the reason.
"""

from __future__ import annotations

import json
import logging
import time
from argparse import Namespace
from collections.abc import Generator
from datetime import datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import pandas as pd
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
from anomalib.utils.config import flatten_dict
from anomalib.utils.logging import hide_output
from lightning.pytorch import seed_everything

from anomalib_dsr.evaluation.learning_curve import LearningCurve, save_curve_chart
from anomalib_dsr.workflows.benchmark.backbone_weights import backbone_name, missing_backbone_reason
from anomalib_dsr.workflows.benchmark.backbones import OfflineWeightsMissing
from anomalib_dsr.workflows.benchmark.callbacks import JobProgress, ThroughputTimer
from anomalib_dsr.workflows.benchmark.config import BenchmarkConfigError, check_config, model_class
from anomalib_dsr.workflows.benchmark.memory import large_allocations_mapped
from anomalib_dsr.workflows.benchmark.models import build_model
from anomalib_dsr.workflows.benchmark.offline_inputs import prepare_offline_inputs
from anomalib_dsr.workflows.benchmark.report import markdown_report, save_chart, with_category, with_labels

logger = logging.getLogger(__name__)


class BudgetedBenchmarkJob(BenchmarkJob):
    """anomalib's benchmark job with the model's training budget, test throughput, a learning curve, progress
    lines, and errors kept as rows."""

    def __init__(
        self,
        accelerator: str,
        model: AnomalibModule,
        datamodule,
        seed: int,
        flat_cfg: dict,
        trainer: dict,
        curve_points: int = 5,
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
        return {
            **row,
            "status": "ok",
            **durations,
            "images_per_second": timer.images_per_second,
            "learning_curve": curve_json,
            **metrics,
        }

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
            f"{r.label} ({r.category})": json.loads(r.learning_curve)
            for r in ok.itertuples()
            if r.learning_curve != "[]"
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
    """anomalib's grid over models and datasets, building models from anywhere in
    :data:`~anomalib_dsr.workflows.benchmark.config.MODEL_MODULES`."""

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
