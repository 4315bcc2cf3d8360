"""The authors' released DSR weights as a Lightning checkpoint of :class:`Dsr`, and our models back in their layout.

Import (``anomalib-dsr import-original``, :func:`import_original`):

1. read the six files of one category (docs/method.md#the-released-code-and-weights): the general VQ-VAE
   ``vq_model_pretrained_128_4096.pckl`` and the five per-category modules, each with ``weights_only=True``;
2. read the widths (``channels``, ``res_hidden``, ``num_embeddings``, ``embedding_dim``,
   ``decoder_bottleneck``, ``unet_width``) off the tensor shapes listed in ``WIDTH_KEYS``, so files of any
   width import, the released ones giving the paper's (128, 64, 4096, 128, 64, 64);
3. build ``Dsr`` with these widths and copy every tensor in: a missing, unexpected or misshaped key is a
   :class:`WeightsError` naming the file, the key and both shapes;
4. write a Lightning checkpoint with a Trainer attached to the model, the same format as one saved by
   training, minus optimiser state: it serves ``anomalib test|predict|export`` and
   ``Dsr.load_from_checkpoint`` but cannot resume training. ``dsr_phase2_steps`` is the paper's 100,000.

Post-processing of an imported model. The released files carry no validation statistics, so anomalib's
``PostProcessor`` holds NaN min/max and thresholds: it then leaves ``pred_score`` and ``anomaly_map`` as
they are (softmax probabilities in [0, 1]) and sets ``pred_label``/``pred_mask`` to probability > 0.5,
the softmax decision boundary. Image and pixel AUROC/AP are threshold-free and unaffected. Pass a
``datamodule`` to :func:`import_original` to calibrate instead: its validation split then sets anomalib's
usual min-max normalisation and F1-adaptive thresholds, as after training.

Export (``anomalib-dsr export-original``, :func:`export_original`) writes a ``Dsr`` checkpoint's modules
in the original layout, readable by the authors' code; import → export → import is bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from anomalib.data import AnomalibDataModule

from anomalib_dsr.checkpoints.loading import load_dsr_checkpoint
from anomalib_dsr.model.lightning_model import Dsr
from anomalib_dsr.model.original_format import (
    ALL_FORMATS,
    RECON_FORMAT,
    VQ_FILE_NAME,
    VQ_FORMAT,
    WIDTH_KEYS,
    FileFormat,
    WeightsError,
    load_original_state,
    original_state,
    read_state_dict,
)
from anomalib_dsr.model.torch_model import DsrModel

PAPER_PHASE2_STEPS = 100_000  # released modules: 100,000 phase-2 and 50,000 phase-3 steps (docs/method.md#training)


def original_paths(checkpoints: str | Path, category: str, vq: str | Path | None = None) -> dict[FileFormat, Path]:
    """The six files of ``category`` in a folder of released checkpoints; ``vq`` defaults to
    ``checkpoints/vq_model_pretrained_128_4096.pckl``."""
    paths = {file_format: file_format.path(checkpoints, category) for file_format in ALL_FORMATS}
    paths[VQ_FORMAT] = Path(vq) if vq is not None else Path(checkpoints) / VQ_FILE_NAME
    return paths


def infer_widths(states: dict[FileFormat, dict[str, torch.Tensor]], paths: dict[FileFormat, Path]) -> dict[str, int]:
    """The width arguments of ``Dsr`` that the original-layout ``states`` were saved with."""
    widths = {}
    for name, (file_format, key, dim) in WIDTH_KEYS.items():
        tensor = states[file_format].get(key)
        if tensor is None or tensor.ndim <= dim:
            found = "missing" if tensor is None else f"of shape {tuple(tensor.shape)}"
            msg = f"{paths[file_format]}: cannot read the model width {name} from tensor {key} ({found})."
            raise WeightsError(msg)
        widths[name] = tensor.shape[dim]
    return widths


def load_original(checkpoints: str | Path, category: str, vq: str | Path | None = None) -> Dsr:
    """A ``Dsr`` (widths from the files, paper defaults otherwise) holding the released weights of ``category``."""
    paths = original_paths(checkpoints, category, vq)
    states = {file_format: read_state_dict(path) for file_format, path in paths.items()}
    widths = infer_widths(states, paths)
    model = Dsr(vq_weights=str(paths[VQ_FORMAT]), **widths)
    try:
        for file_format, state in states.items():
            load_original_state(getattr(model.model, file_format.attribute), state, file_format, paths[file_format])
    except WeightsError as error:
        msg = f"{error} (model widths read off the files: {widths})"
        raise WeightsError(msg) from None
    model.phase2_steps = PAPER_PHASE2_STEPS
    return model


def import_original(
    checkpoints: str | Path,
    category: str,
    output: str | Path,
    vq: str | Path | None = None,
    datamodule: AnomalibDataModule | None = None,
) -> Path:
    """Write the released weights of ``category`` as a Lightning checkpoint of ``Dsr`` at ``output``.

    Args:
        checkpoints: folder of the authors' ``DSR_*_<category>.pckl`` files.
        category: the ``<category>`` of those file names, e.g. ``bottle``.
        output: the ``.ckpt`` file to write.
        vq: general VQ-VAE file (default: ``checkpoints/vq_model_pretrained_128_4096.pckl``).
        datamodule: if given, its validation split calibrates anomalib's normalisation and thresholds.
    """
    model = load_original(checkpoints, category, vq)
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    if datamodule is not None:
        pl.Trainer(accelerator="auto", devices=1, **quiet).validate(model, datamodule=datamodule, verbose=False)
        model.cpu()
    # A fresh trainer, so that no datamodule hyper-parameters end up in the checkpoint.
    trainer = pl.Trainer(accelerator="cpu", devices=1, **quiet)
    trainer.strategy.connect(model)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(output, weights_only=True)
    return output


def save_original(model: DsrModel, output: str | Path, category: str) -> list[Path]:
    """Write ``model``'s modules as the six original-layout files of ``category`` into the folder ``output``.

    The authors' code reads one general VQ-VAE file for every category, so an existing
    ``vq_model_pretrained_128_4096.pckl`` in ``output`` that differs from ``model``'s is an error.
    """
    if model.object_decoder is None:
        msg = (
            "This model decodes I_spc with the general decoder (spc_decoder='general') and has no D_spc; the authors' "
            f"layout needs one ({RECON_FORMAT.file_name}). Keep the Lightning checkpoint or the OpenVINO export."
        )
        raise WeightsError(msg)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for file_format in ALL_FORMATS:
        path = file_format.path(output, category)
        state = original_state(getattr(model, file_format.attribute), file_format)
        if file_format is VQ_FORMAT and path.exists() and not _same_tensors(read_state_dict(path), state):
            msg = (
                f"{path} already holds a different general VQ-VAE; the authors' code uses one VQ-VAE for all "
                "categories, so export models trained on different VQ weights into different folders."
            )
            raise WeightsError(msg)
        torch.save(state, path)
        paths.append(path)
    return paths


def export_original(ckpt: str | Path, output: str | Path, category: str) -> list[Path]:
    """Write the modules of a ``Dsr`` Lightning checkpoint as the original files of ``category`` into ``output``."""
    return save_original(load_dsr_checkpoint(ckpt).model, output, category)


def _same_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
