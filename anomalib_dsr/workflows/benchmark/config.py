"""Checks of a benchmark config before anything runs, and the model classes it may name.

Models may come from ``anomalib.models`` or ``anomalib_dsr`` (:data:`MODEL_MODULES`; anomalib's ``get_model`` refuses
``anomalib_dsr.Dsr``). Each model entry needs a training budget (``trainer: {max_steps: ...}`` beside
``class_path``): anomalib's job sets none, so Lightning's default of 1000 epochs would apply.
"""

from __future__ import annotations

import importlib
import inspect

from anomalib.models import AnomalibModule

# Where model classes may come from (anomalib's own whitelist, plus this package).
MODEL_MODULES = ("anomalib.models", "anomalib_dsr")
# Keys of a model entry beside anomalib's class_path / init_args.
RUNNER_KEYS = ("trainer", "backbone_weights", "pretrain_vq", "curve_points")


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
            valid = ", ".join(("class_path", "init_args", *RUNNER_KEYS))
            msg = f"model {cls.__name__}: unknown keys {sorted(unknown)}; valid: {valid}."
            raise BenchmarkConfigError(msg)
        if "pretrain_vq" in entry and not (entry.get("init_args") or {}).get("vq_weights"):
            msg = f"model {cls.__name__}: 'pretrain_vq' needs 'init_args: {{vq_weights: PATH}}', the file it writes."
            raise BenchmarkConfigError(msg)
        budget = entry.get("trainer", {})
        if "max_steps" not in budget and "max_epochs" not in budget:
            msg = f"model {cls.__name__}: set a training budget, e.g. 'trainer: {{max_steps: 1000}}' or 'max_epochs'."
            raise BenchmarkConfigError(msg)
