"""The package layout: every documented import path and config class path resolves, the old paths of moved modules
give the same module objects, every CLI command answers ``--help``, and no sub-package imports one that imports it
back (docs/development.md, "Package layout")."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from anomalib_dsr._moved import MOVED

PACKAGE = Path(__file__).resolve().parents[1] / "anomalib_dsr"
CONFIGS = PACKAGE.parent / "configs"

# Public names, by module, that the README, docs/, configs/ and the notebook use.
DOCUMENTED = {
    "anomalib_dsr": ["Dsr", "DsrModel"],
    "anomalib_dsr.model": ["Dsr", "DsrModel"],
    "anomalib_dsr.model.layers": ["fixed_algorithms", "ENV_VARIABLE", "TimedConv3x3", "InstanceNorm2d", "Upsample2x"],
    "anomalib_dsr.model.layers.autotune": ["fixed_algorithms", "run_fastest", "convolution_section"],
    "anomalib_dsr.model.callbacks": ["FiniteLossGuard", "RngStateCheckpoint", "FrozenModulesSetup"],
    "anomalib_dsr.model.original_format": ["WeightsError", "VQ_FILE_NAME"],
    "anomalib_dsr.model.warm_start": ["load_warm_start", "warm_start_state"],
    "anomalib_dsr.model.layers.precision": ["has_native_bf16", "resolve_training_precision"],
    "anomalib_dsr.checkpoints": ["load_dsr_checkpoint"],
    "anomalib_dsr.checkpoints.original_checkpoint": ["import_original", "export_original"],
    "anomalib_dsr.data.demo_data": ["make_demo_dataset"],
    "anomalib_dsr.data.elpv": ["prepare_elpv"],
    "anomalib_dsr.data.kolektor": ["prepare_kolektor"],
    "anomalib_dsr.data.data_check": ["check_datamodule", "DataError"],
    "anomalib_dsr.data.general_images": ["GENERAL_VQ_FILE", "GENERAL_VQ_WIDTHS", "GeneralImages"],
    "anomalib_dsr.data.image_folders": ["ImageFolders", "IMAGE_EXTENSIONS"],
    "anomalib_dsr.evaluation.paper_protocol": ["PaperEvaluator"],
    "anomalib_dsr.evaluation.paper_table": ["table_from_files"],
    "anomalib_dsr.evaluation.learning_curve": ["LearningCurve"],
    "anomalib_dsr.deploy.export": ["keep_code_path_in_f32", "quantize", "code_path", "REWRITES"],
    "anomalib_dsr.deploy.inference": ["DsrInferencer", "to_rgb"],
    "anomalib_dsr.workflows.demo": ["run_demo", "DemoSettings"],
    "anomalib_dsr.workflows.pretrain_vq": ["pretrain_vq"],
    "anomalib_dsr.workflows.pretrain_warm_start": ["pretrain_warm_start"],
    "anomalib_dsr.workflows.inspect": ["inspect"],
    "anomalib_dsr.workflows.benchmark": ["run_benchmark", "BenchmarkConfigError"],
}


@pytest.mark.parametrize("module", sorted(DOCUMENTED))
def test_documented_paths_import(module: str) -> None:
    imported = importlib.import_module(module)
    missing = [name for name in DOCUMENTED[module] if not hasattr(imported, name)]
    assert not missing, (module, missing)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_paths_of_moved_modules_give_the_same_module(old: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_config_class_paths_resolve() -> None:
    """Every ``class_path`` of ``configs/`` with a dot (anomalib's short names like ``Draem`` are anomalib's)."""
    paths = set()
    for config in CONFIGS.rglob("*.yaml"):
        paths |= set(re.findall(r"class_path:\s*([\w.]+\.[A-Z]\w*)", config.read_text()))
    assert "anomalib_dsr.evaluation.paper_protocol.PaperEvaluator" in paths and "anomalib_dsr.Dsr" in paths
    for path in paths:
        module, name = path.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), path


@pytest.mark.parametrize(
    "command",
    ["pretrain-vq", "pretrain-warm-start", "demo", "import-original", "export-original", "paper-table", "benchmark",
     "inspect", "prepare-kolektor"],
)  # fmt: skip
def test_every_cli_command_answers_help(command: str, capsys) -> None:
    from anomalib_dsr.cli import main

    with pytest.raises(SystemExit) as exit_code:
        main([command, "--help"])
    assert exit_code.value.code == 0
    assert "usage: anomalib-dsr" in capsys.readouterr().out


def sub_package_imports() -> dict[str, set[str]]:
    """Which sub-packages (and top-level modules) of ``anomalib_dsr`` each one imports, lazy imports included."""
    edges: dict[str, set[str]] = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE).parts
        source = parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(file.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("anomalib_dsr.") and (target := name.split(".")[1]) != source:
                    edges.setdefault(source, set()).add(target)
    return edges


def test_no_sub_package_imports_one_that_imports_it_back() -> None:
    """The sub-packages' imports form no cycle, and follow docs/development.md: model, data and deploy at the
    bottom, checkpoints and evaluation above the model, workflows and the CLI on top."""
    edges = sub_package_imports()
    assert edges.get("data", set()) == set() and edges.get("deploy", set()) == set(), edges
    assert edges.get("model", set()) <= {"data", "deploy"}, edges
    assert edges.get("checkpoints", set()) <= {"model"}, edges
    assert edges.get("evaluation", set()) <= {"model", "data"}, edges

    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for target in edges.get(stack.pop(), set()) - seen:
                seen.add(target)
                stack.append(target)
        return seen

    cycles = [name for name in edges if name in reachable(name)]
    assert not cycles, edges


def test_no_module_is_longer_than_400_lines() -> None:
    long = {
        str(f.relative_to(PACKAGE)): n for f in PACKAGE.rglob("*.py") if (n := len(f.read_text().splitlines())) > 400
    }
    assert not long, long
