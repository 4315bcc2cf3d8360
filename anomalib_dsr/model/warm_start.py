"""Warm-start files: DSR's phase-2 and phase-3 modules trained once on general images, to fine-tune per category.

Not in the paper, which learns them per category from scratch; the idea is the general VQ-VAE's: learn what is generic
once. A file is a plain ``state_dict`` (``weights_only``) of float16 tensors named ``<module>.<key>`` for the modules of
:data:`WARM_MODULES` the model had, plus ``vq_fingerprint``: the first rows of the general VQ-VAE's low codebook it was
trained with, because restriction modules learnt on one VQ-VAE's codes mean nothing on another's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from anomalib_dsr.model.original_format import WeightsError, read_state_dict
from anomalib_dsr.model.torch_model import DsrModel

WARM_MODULES = ("restriction_lo", "restriction_hi", "object_decoder", "anomaly_detection", "upsampling")
FINGERPRINT = "vq_fingerprint"
FINGERPRINT_ROWS = 8
PRETRAIN_HINT = "Write one for this model's VQ-VAE and widths with `anomalib-dsr pretrain-warm-start --config RECIPE`."


def vq_fingerprint(model: DsrModel) -> torch.Tensor:
    """``(FINGERPRINT_ROWS, D)``: the first codes of the low codebook, float32 on the CPU."""
    return model.vq.codebook_lo.embedding.weight[:FINGERPRINT_ROWS].detach().float().cpu().clone()


def warm_start_state(model: DsrModel) -> dict[str, torch.Tensor]:
    """``model``'s warm-start modules as float16 tensors (other dtypes kept), with the VQ-VAE's fingerprint."""
    state = {
        f"{name}.{key}": value.detach().cpu().to(torch.float16 if value.is_floating_point() else value.dtype)
        for name in WARM_MODULES
        if (module := getattr(model, name)) is not None
        for key, value in module.state_dict().items()
    }
    state[FINGERPRINT] = vq_fingerprint(model)
    return state


def load_warm_start(model: DsrModel, path: str | Path) -> None:
    """Copy the warm-start file ``path`` into ``model``'s modules (after its VQ-VAE is loaded).

    Raises :class:`WeightsError` naming the file: not a warm-start file, trained on another general VQ-VAE, a module
    of the model missing from it, or tensors whose shapes do not fit the model's widths. A file may hold a module the
    model lacks (D_spc, for ``spc_decoder="general"``); it is not used.
    """
    path = Path(path)
    state = read_state_dict(path)
    if FINGERPRINT not in state:
        msg = f"{path} is not a DSR warm-start file (it has no {FINGERPRINT!r} entry). {PRETRAIN_HINT}"
        raise WeightsError(msg)
    if not torch.equal(state[FINGERPRINT], vq_fingerprint(model)):  # exact: a stored copy of the same tensor
        msg = (
            f"{path} was trained on another general VQ-VAE than this model's (vq_weights): its modules read other "
            f"codes. {PRETRAIN_HINT}"
        )
        raise WeightsError(msg)
    for name in WARM_MODULES:
        if (module := getattr(model, name)) is None:
            continue
        expected = module.state_dict()
        found = {key.removeprefix(f"{name}."): v for key, v in state.items() if key.startswith(f"{name}.")}
        missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        if missing or unexpected:
            msg = (
                f"{path} does not fit this model's {name}: missing {missing}, unexpected {unexpected}. {PRETRAIN_HINT}"
            )
            raise WeightsError(msg)
        misshaped = [
            f"{name}.{key} is {tuple(found[key].shape)}, the model's {tuple(value.shape)}"
            for key, value in expected.items()
            if found[key].shape != value.shape
        ]
        if misshaped:
            msg = (
                f"{path} was trained with other widths (decoder_bottleneck, unet_width, embedding_dim or the VQ "
                f"widths): {'; '.join(misshaped[:3])}. {PRETRAIN_HINT}"
            )
            raise WeightsError(msg)
        module.load_state_dict({key: found[key].to(value.dtype) for key, value in expected.items()})
