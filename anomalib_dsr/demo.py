"""``make demo``: the whole DSR workflow offline on CPU, on a dataset built from scikit-image photos.

1. build an MVTec-layout dataset (``demo_data``); 2. pretrain a small general VQ-VAE on its good
images (phase 1); 3. train DSR phases 2 and 3 with anomalib's ``Engine``; 4. test and print image
AUROC and pixel AP; anomalib's visualiser writes anomaly-map overlays as PNG.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_dsr.demo_data import make_demo_dataset
from anomalib_dsr.lightning_model import Dsr
from anomalib_dsr.pretraining import pretrain_vq

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo run. The defaults finish in minutes on 2 CPU cores; for that, widths are a
    quarter of the paper's (channels 128, 4096 codes of 128 dims, U-Net width 64) and images 64x64."""

    image_size: int = 64
    num_train: int = 80
    vq_steps: int = 300
    dsr_steps: int = 450
    batch_size: int = 8
    channels: int = 32
    res_hidden: int = 16
    num_embeddings: int = 256
    embedding_dim: int = 32
    decoder_bottleneck: int = 16
    unet_width: int = 16
    seed: int = 0

    @property
    def vq_widths(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k in ("channels", "res_hidden", "num_embeddings", "embedding_dim")}


def run_demo(
    output: str | Path = "demo_output",
    settings: DemoSettings = DemoSettings(),
    progress: bool = True,
    precision: str | None = None,
) -> dict[str, float]:
    """Run the demo into ``output``; returns the test metrics. ``precision``: Lightning's, for DSR's
    training and test (e.g. ``"bf16-mixed"``); ``None`` keeps the trainer's default (fp32)."""
    output = Path(output).resolve()
    torch.set_flush_denormal(True)  # CPU: subnormal floats in late training steps are many times slower
    seed_everything(settings.seed, workers=True)
    print(f"[1/4] Building the demo dataset in {output / 'data'}")
    make_demo_dataset(output / "data", image_size=settings.image_size, num_train=settings.num_train, seed=settings.seed)

    print(f"[2/4] Pretraining a small general VQ-VAE ({settings.vq_steps} steps)")
    vq_file = pretrain_vq(
        [output / "data" / "gravel" / "train" / "good"],
        output / "vq_weights.pckl",
        image_size=settings.image_size,
        max_steps=settings.vq_steps,
        batch_size=16,
        seed=settings.seed,
        resume=False,
        trainer_kwargs={"enable_progress_bar": progress, "enable_model_summary": False},
        **settings.vq_widths,
    )

    print(f"[3/4] Training DSR: {settings.dsr_steps} steps, phases 2 and 3 in the paper's 2:1 ratio")
    model = Dsr(
        image_size=settings.image_size,
        vq_weights=vq_file,
        decoder_bottleneck=settings.decoder_bottleneck,
        unet_width=settings.unet_width,
        **settings.vq_widths,
    )
    datamodule = MVTecAD(
        root=output / "data",
        category="gravel",
        train_batch_size=settings.batch_size,
        eval_batch_size=settings.batch_size,
        num_workers=0,
        seed=settings.seed,
    )
    engine = Engine(
        max_steps=settings.dsr_steps,
        default_root_dir=output / "results",
        enable_progress_bar=progress,
        enable_model_summary=False,
        check_val_every_n_epoch=None,
        val_check_interval=settings.dsr_steps,
        **({"precision": precision} if precision is not None else {}),
    )
    engine.fit(model, datamodule=datamodule)

    print("[4/4] Testing")
    metrics = engine.test(model, datamodule=datamodule, verbose=False)[0]
    results = Path(engine.trainer.default_root_dir)
    print(f"\nimage AUROC: {metrics['image_AUROC']:.3f}")
    print(f"pixel AP:    {metrics['pixel_AUPR']:.3f}   (pixel AUROC: {metrics['pixel_AUROC']:.3f})")
    print(f"\nOutputs in {output}:")
    print(f"  dataset           {output / 'data'}")
    print(f"  VQ-VAE weights    {vq_file}")
    print(f"  DSR checkpoint    {results / 'weights' / 'lightning' / 'model.ckpt'}")
    print(f"  overlays (PNG)    {results / 'images'}")
    return metrics
