"""Warm start: DSR's phases 2 and 3 trained once on general images, written as a warm-start file.

The general photographs (:mod:`anomalib_dsr.data.general_images`, no download) with DSR's own anomaly simulation (latent
anomalies in Perlin-noise regions for phase 2, image anomalies for phase 3) and the recipe's schedule; the restriction
modules, D_spc and both U-Nets then go to :func:`anomalib_dsr.model.warm_start.warm_start_state` as float16.
``Dsr(warm_start=...)`` fine-tunes them per category.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from anomalib.data import ImageBatch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from anomalib_dsr.data.general_images import GeneralImages
from anomalib_dsr.model.lightning_model import Dsr
from anomalib_dsr.model.warm_start import warm_start_state

logger = logging.getLogger(__name__)


def image_batch(images: list[torch.Tensor]) -> ImageBatch:
    """Collate ``(3, H, W)`` images into the anomalib batch ``Dsr.training_step`` reads."""
    return ImageBatch(image=torch.stack(images))


def recipe_arguments(config: str | Path) -> dict[str, Any]:
    """``Dsr``'s arguments of a recipe config (``model.init_args``), without its own warm start."""
    init_args = dict(yaml.safe_load(Path(config).read_text())["model"]["init_args"])
    init_args.pop("warm_start", None)
    return init_args


def pretrain_warm_start(
    output: str | Path,
    dsr_arguments: dict[str, Any],
    max_steps: int = 3000,
    batch_size: int = 8,
    seed: int = 0,
    resume: bool = True,
    trainer_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Train ``Dsr(**dsr_arguments)`` for ``max_steps`` on augmented crops of the general photographs; write ``output``.

    Checkpoints go beside ``output`` (``<stem>_checkpoints/last.ckpt``, every tenth of the run); with ``resume`` a run
    continues from there.
    """
    pl.seed_everything(seed, workers=True)
    output = Path(output)
    model = Dsr(**dsr_arguments, evaluator=False, visualizer=False, post_processor=False)
    size = model.pre_processor.transform.transforms[0].size
    loader = DataLoader(GeneralImages(size[0], length=max_steps * batch_size), batch_size, collate_fn=image_batch)
    checkpoint_dir = output.with_name(output.stem + "_checkpoints")
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, every_n_train_steps=max(1, max_steps // 10))
    trainer = pl.Trainer(
        max_steps=max_steps, callbacks=[checkpoint], default_root_dir=checkpoint_dir, logger=False,
        limit_val_batches=0, num_sanity_val_steps=0, **(trainer_kwargs or {}),
    )  # fmt: skip
    last = checkpoint_dir / "last.ckpt"
    trainer.fit(model, loader, ckpt_path=last if resume and last.is_file() else None)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(warm_start_state(model.model), output)
    logger.info("Warm start written to %s", output)
    return output
