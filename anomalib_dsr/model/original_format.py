"""The released checkpoint layout (docs/method.md#the-released-code-and-weights) and safe loading of weight files.

Each released file is a plain ``state_dict``. Our modules use the same structure with clearer names;
:data:`ALL_FORMATS` (``VQ_FORMAT`` and the five ``MODULE_FORMATS``) gives, per file, the top-level
renames, and the remaining path components differ only by the original's leading underscores
(``_residual_stack._layers.0._block.1`` ↔ ``residual_stack.layers.0.block.1``). :data:`WIDTH_KEYS` says
which tensor shapes give the model's widths. Every file is read with ``weights_only=True``.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Path components that carry a leading underscore in the original code.
_UNDERSCORED = {
    "conv_1", "conv_2", "conv_3", "conv_trans_1", "conv_trans_2",
    "residual_stack", "layers", "block", "ema_w", "ema_cluster_size", "embedding",
}  # fmt: skip

VQ_FILE_NAME = "vq_model_pretrained_128_4096.pckl"


class WeightsError(ValueError):
    """A weights file is missing, unreadable or does not fit the model."""


@dataclass(frozen=True)
class FileFormat:
    """One released file: its name pattern, the ``DsrModel`` attribute it fills, the top-level renames."""

    file_name: str  # ``{category}`` is replaced by the MVTec category
    attribute: str
    renames: tuple[tuple[str, str], ...]  # (original prefix, our prefix)

    def to_ours(self, key: str) -> str:
        """Original key → our key."""
        for original, ours in self.renames:
            if key.startswith(original + "."):
                key = _join(ours, key[len(original) + 1 :])
                break
        return ".".join(part.removeprefix("_") for part in key.split("."))

    def path(self, directory: str | Path, category: str) -> Path:
        """Where this file lies in a folder of released checkpoints."""
        return Path(directory) / self.file_name.format(category=category)

    def to_original(self, key: str) -> str:
        """Our key → original key."""
        for original, ours in self.renames:
            if not ours or key.startswith(ours + "."):
                key = _join(original, key[len(ours) + 1 if ours else 0 :])
                break
        return ".".join(f"_{part}" if part in _UNDERSCORED else part for part in key.split("."))


def _join(prefix: str, rest: str) -> str:
    return f"{prefix}.{rest}" if prefix else rest


VQ_FORMAT = FileFormat(
    VQ_FILE_NAME,
    "vq",
    (
        ("_encoder_b", "encoder_hi"),
        ("_encoder_t", "encoder_lo"),
        ("_pre_vq_conv_top", "pre_quant_lo"),
        ("_pre_vq_conv_bot", "pre_quant_hi"),
        ("_vq_vae_top", "codebook_lo"),
        ("_vq_vae_bot", "codebook_hi"),
        ("_decoder_b", "decoder"),
        ("upsample_t", "upsample_lo"),
    ),
)
_UNET_RENAMES = (("unet", ""),)
RECON_FORMAT = FileFormat(
    "DSR_image_recon_module_{category}.pckl",
    "object_decoder",
    (
        ("pre_vq_conv", "bottleneck"),
        ("_conv_1", "decoder.conv_1"),
        ("_residual_stack", "decoder.residual_stack"),
        ("_conv_trans_1", "decoder.conv_trans_1"),
        ("_conv_trans_2", "decoder.conv_trans_2"),
    ),
)
ANOMALY_DET_FORMAT = FileFormat("DSR_anomaly_det_module_{category}.pckl", "anomaly_detection", _UNET_RENAMES)
MODULE_FORMATS = (
    FileFormat("DSR_subspace_restriction_hi_{category}.pckl", "restriction_hi", _UNET_RENAMES),
    FileFormat("DSR_subspace_restriction_lo_{category}.pckl", "restriction_lo", _UNET_RENAMES),
    RECON_FORMAT,
    ANOMALY_DET_FORMAT,
    FileFormat("DSR_upsample_module_{category}.pckl", "upsampling", _UNET_RENAMES),
)
ALL_FORMATS = (VQ_FORMAT, *MODULE_FORMATS)

# Where each width argument of ``Dsr``/``DsrModel`` is read off the files: (file, original key, dimension).
# Every other tensor is then checked against the model these widths build.
WIDTH_KEYS: dict[str, tuple[FileFormat, str, int]] = {
    "channels": (VQ_FORMAT, "_encoder_b._conv_2.weight", 0),
    "res_hidden": (VQ_FORMAT, "_encoder_b._residual_stack._layers.0._block.1.weight", 0),
    "num_embeddings": (VQ_FORMAT, "_vq_vae_top._embedding.weight", 0),
    "embedding_dim": (VQ_FORMAT, "_vq_vae_top._embedding.weight", 1),
    "decoder_bottleneck": (RECON_FORMAT, "pre_vq_conv.weight", 0),
    "unet_width": (ANOMALY_DET_FORMAT, "unet.encoder.block1.0.weight", 0),
}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain ``state_dict`` with ``weights_only=True``; failures are :class:`WeightsError` naming the file."""
    path = Path(path)
    if not path.is_file():
        msg = f"Weights file not found: {path}"
        raise WeightsError(msg)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        msg = (
            f"{path} contains pickled Python objects, not only tensors; refusing to execute them "
            f"(weights are loaded with weights_only=True). Save a plain state_dict instead. "
            f"({_unpickling_detail(error)})"
        )
        raise WeightsError(msg) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        detail = str(error).split(". ")[0] or "unexpected end of file"
        msg = f"{path} is not a readable torch weights file (truncated or corrupt?): {detail}."
        raise WeightsError(msg) from None
    except Exception as error:  # noqa: BLE001 - garbage bytes make the unpickler fail in arbitrary ways (KeyError, ...)
        msg = f"{path} is not a readable torch weights file (truncated or corrupt?): {type(error).__name__}: {error}."
        raise WeightsError(msg) from None
    if isinstance(state, dict) and "state_dict" in state and "pytorch-lightning_version" in state:
        msg = f"{path} is a Lightning checkpoint, not a plain state_dict of weights."
        raise WeightsError(msg)
    if not isinstance(state, dict):
        msg = f"{path} does not hold a state_dict (a dict of tensors), found {type(state).__name__}."
        raise WeightsError(msg)
    not_tensors = [f"{key} ({type(v).__name__})" for key, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        msg = f"{path} does not hold a state_dict: these entries are not tensors: {', '.join(not_tensors)}."
        raise WeightsError(msg)
    return state


def _unpickling_detail(error: pickle.UnpicklingError) -> str:
    """The one line of torch's long weights-only message that says what was refused."""
    match = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
    return match.group(1).split(". Please")[0] if match else str(error).splitlines()[0]


def load_original_state(
    module: nn.Module, state: dict[str, torch.Tensor], file_format: FileFormat, source: Path
) -> None:
    """Copy an original-layout ``state`` into ``module``; any missing, unexpected or misshaped key is an error.

    A key counts as expected only if it is exactly the original spelling of one of ``module``'s keys, so
    two spellings of one tensor (``_conv_1`` and ``conv_1``) cannot silently replace each other.
    """
    expected = module.state_dict()
    ours: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        mapped = file_format.to_ours(key)
        if mapped in expected and file_format.to_original(mapped) == key:
            ours[mapped] = value
        else:
            unexpected.append(key)
    missing = [file_format.to_original(key) for key in expected if key not in ours]
    if missing or unexpected:
        msg = (
            f"{source} does not match the layout of {file_format.file_name}: "
            f"missing keys {missing}, unexpected keys {sorted(unexpected)}."
        )
        raise WeightsError(msg)
    misshaped = [
        f"{file_format.to_original(key)} found {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
        for key, value in ours.items()
        if value.shape != expected[key].shape
    ]
    if misshaped:
        msg = f"{source}: tensor shapes do not fit this model's widths: {'; '.join(misshaped)}."
        raise WeightsError(msg)
    module.load_state_dict(ours)


def original_state(module: nn.Module, file_format: FileFormat) -> dict[str, torch.Tensor]:
    """``module``'s weights in the original layout, as plain contiguous CPU tensors."""
    return {file_format.to_original(k): v.detach().cpu().clone() for k, v in module.state_dict().items()}
