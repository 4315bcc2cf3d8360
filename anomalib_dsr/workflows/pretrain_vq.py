"""Phase 1: pretraining the general VQ-VAE on folders of images (docs/method.md#phase-1).

The authors released weights but no training code; this follows their later recipe: Adam, lr 2e-4,
LR x0.1 at 80 % and 90 % of the steps, L2 reconstruction loss plus the commitment losses, EMA
codebooks. The result is written in the original tensor layout, interchangeable with
``vq_model_pretrained_128_4096.pckl``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from anomalib_dsr.data.general_images import GeneralImages
from anomalib_dsr.data.image_folders import ImageFolders
from anomalib_dsr.model.callbacks import FiniteLossGuard, RngStateCheckpoint
from anomalib_dsr.model.original_format import VQ_FORMAT, original_state
from anomalib_dsr.model.vq_vae import GeneralVQVAE

logger = logging.getLogger(__name__)


class VQVAEPretraining(pl.LightningModule):
    """Trains :class:`GeneralVQVAE` on RGB batches; the VQ-VAE sees them as BGR like the released model.

    Args:
        channels, res_hidden, num_embeddings, embedding_dim: widths (paper: 128, 64, 4096, 128).
        learning_rate: Adam LR (paper's later recipe: 2e-4), x0.1 at 80 % and 90 % of the steps.
        dead_code_threshold: EMA cluster size under which a code is restarted on a random feature
            (not in the paper; keeps small-data runs from collapsing onto a few codes; 0 = off).
    """

    def __init__(
        self,
        channels: int = 128,
        res_hidden: int = 64,
        num_embeddings: int = 4096,
        embedding_dim: int = 128,
        learning_rate: float = 2e-4,
        dead_code_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = GeneralVQVAE(
            channels, res_hidden, num_embeddings, embedding_dim, dead_code_threshold=dead_code_threshold
        )
        self.learning_rate = learning_rate

    def training_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        del batch_idx
        images = images.flip(1)  # RGB → BGR, the released weights' channel order (docs/method.md#input)
        reconstruction, lo, hi = self.model(images)
        reconstruction_loss = F.mse_loss(reconstruction, images)
        loss = reconstruction_loss + lo.commitment_loss + hi.commitment_loss
        self.log("reconstruction", reconstruction_loss, prog_bar=True)
        self.log_dict(
            {
                "perplexity_lo": lo.perplexity,
                "perplexity_hi": hi.perplexity,
                "codes_used_lo": lo.codes_used,
                "codes_used_hi": hi.codes_used,
            },
            prog_bar=True,
        )
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=self.learning_rate)
        total = int(self.trainer.estimated_stepping_batches)
        milestones = [int(0.8 * total), int(0.9 * total)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list[pl.Callback]:
        """The non-finite loss guard, and the random state in checkpoints (data order and dead-code restarts draw
        from it), as :class:`~anomalib_dsr.Dsr` has them."""
        return [FiniteLossGuard(), RngStateCheckpoint("vq_rng_states")]

    def save_weights(self, path: str | Path) -> Path:
        """Write the VQ-VAE in the original layout (a plain state_dict) to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(original_state(self.model, VQ_FORMAT), path)
        return path


@torch.no_grad()
def codebook_usage(model: GeneralVQVAE, loader: DataLoader, max_images: int = 512) -> dict[str, int]:
    """Distinct codes chosen per level over up to ``max_images`` images of ``loader`` (RGB batches)."""
    used = {"lo": torch.zeros(model.codebook_lo.num_embeddings, dtype=torch.bool),
            "hi": torch.zeros(model.codebook_hi.num_embeddings, dtype=torch.bool)}  # fmt: skip
    seen = 0
    for images in loader:
        encoded = model.encode(images.flip(1).to(next(model.parameters()).device))
        used["lo"][model.codebook_lo.nearest(encoded.z_lo).flatten().cpu()] = True
        used["hi"][model.codebook_hi.nearest(encoded.z_hi).flatten().cpu()] = True
        seen += images.shape[0]
        if seen >= max_images:
            break
    return {level: int(mask.sum()) for level, mask in used.items()}


def pretrain_vq(
    images: Sequence[str | Path] | None,
    output: str | Path,
    image_size: int = 256,
    max_steps: int = 100_000,
    batch_size: int = 64,
    num_workers: int = 0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    seed: int = 0,
    trainer_kwargs: dict[str, Any] | None = None,
    general: bool = False,
    **model_kwargs: Any,
) -> Path:
    """Pretrain the general VQ-VAE and write ``output`` in the original tensor layout.

    The images are every image under the folders ``images``, or with ``general`` (and ``images=None``) the
    augmented photographs installed packages ship (:mod:`anomalib_dsr.data.general_images`, no download).
    Defaults follow the authors' later recipe (256x256, batch 64, 100k steps). Checkpoints go to
    ``checkpoint_dir`` (default: beside ``output``); with ``resume`` a run continues from ``last.ckpt``.
    The share of each codebook in use at the end is logged.
    """
    if general == bool(images):
        msg = "pretrain_vq needs either image folders (`images`) or `general=True`, not both or neither."
        raise ValueError(msg)
    pl.seed_everything(seed, workers=True)
    output = Path(output)
    checkpoint_dir = (
        Path(checkpoint_dir) if checkpoint_dir else output.with_suffix("").with_name(output.stem + "_checkpoints")
    )
    dataset = GeneralImages(image_size, length=max_steps * batch_size) if general else ImageFolders(images, image_size)
    loader = DataLoader(
        dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, drop_last=True, num_workers=num_workers
    )
    module = VQVAEPretraining(**model_kwargs)
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir, save_last=True, every_n_train_steps=max(1, min(1000, max_steps // 10))
    )
    trainer_kwargs = dict(trainer_kwargs or {})
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=[checkpoint, *trainer_kwargs.pop("callbacks", [])],
        default_root_dir=checkpoint_dir,
        logger=False,
        **trainer_kwargs,
    )
    last = checkpoint_dir / "last.ckpt"
    trainer.fit(module, loader, ckpt_path=last if resume and last.is_file() else None)
    usage = codebook_usage(module.model.eval(), loader)
    k = module.model.codebook_lo.num_embeddings
    logger.info(
        "Codebook usage on %d training images: lo %d/%d codes, hi %d/%d codes",
        min(len(dataset), 512),
        usage["lo"],
        k,
        usage["hi"],
        k,
    )
    logger.info("VQ-VAE weights written to %s", module.save_weights(output))
    return output
