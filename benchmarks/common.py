"""Helpers the benchmark scripts share; they import it as ``common`` (``python benchmarks/<script>.py`` puts this
folder first on ``sys.path``)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (Linux: ``/proc/cpuinfo``, as ``lscpu`` prints it), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def demo_datamodule(root: Path, batch_size: int = 8):
    """anomalib's ``MVTecAD`` datamodule of a demo dataset (``make_demo_dataset``; category ``gravel``) at ``root``."""
    from anomalib.data import MVTecAD

    return MVTecAD(root=root, category="gravel", train_batch_size=batch_size, eval_batch_size=batch_size, num_workers=0)
