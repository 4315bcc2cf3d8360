"""Module paths from before the package was laid out by role, kept importable (configs and scripts name them).

Importing an old path gives the very module object of its new path, so ``isinstance`` checks, class paths in configs
(``anomalib_dsr.workflows.paper_protocol.PaperEvaluator``) and monkeypatching behave as with the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

MOVED = {
    "anomalib_dsr.checkpoints.original_format": "anomalib_dsr.model.original_format",
    "anomalib_dsr.model.graph_capture": "anomalib_dsr.model.layers.graph_capture",
    "anomalib_dsr.model.winograd": "anomalib_dsr.model.layers.winograd",
    "anomalib_dsr.model.tap_sums": "anomalib_dsr.model.layers.tap_sums",
    "anomalib_dsr.model.data_check": "anomalib_dsr.data.data_check",
    "anomalib_dsr.model.general_images": "anomalib_dsr.data.general_images",
    "anomalib_dsr.model.pretraining": "anomalib_dsr.workflows.pretrain_vq",
    "anomalib_dsr.workflows.demo_data": "anomalib_dsr.data.demo_data",
    "anomalib_dsr.workflows.elpv": "anomalib_dsr.data.elpv",
    "anomalib_dsr.workflows.kolektor": "anomalib_dsr.data.kolektor",
    "anomalib_dsr.workflows.paper_protocol": "anomalib_dsr.evaluation.paper_protocol",
    "anomalib_dsr.workflows.paper_table": "anomalib_dsr.evaluation.paper_table",
    "anomalib_dsr.workflows.learning_curve": "anomalib_dsr.evaluation.learning_curve",
    "anomalib_dsr.workflows.offline_backbones": "anomalib_dsr.workflows.benchmark.backbones",
    "anomalib_dsr.export": "anomalib_dsr.deploy.export",
    "anomalib_dsr.inference": "anomalib_dsr.deploy.inference",
}


class _MovedLoader(importlib.abc.Loader):
    """Loads an old path as the module of its new path."""

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the new path's module is already executed."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths of :data:`MOVED`; every other name is left to Python's own finders."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        del path, target
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedLoader())


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
