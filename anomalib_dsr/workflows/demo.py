"""``make demo``: the whole DSR workflow offline on CPU, on a dataset built from scikit-image photos.

1. build an MVTec-layout dataset (``demo_data``); 2. take the small general VQ-VAE that ships with the
package (phase 1, trained on other photographs: ``general_images``); 3. train DSR phases 2 and 3 with
anomalib's ``Engine``, recording a learning curve; 4. test and print image AUROC and pixel AP; anomalib's
visualiser writes anomaly-map overlays as PNG.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_dsr.data.demo_data import make_demo_dataset
from anomalib_dsr.data.general_images import GENERAL_VQ_FILE, GENERAL_VQ_WIDTHS
from anomalib_dsr.evaluation.learning_curve import LearningCurve, save_curve_chart
from anomalib_dsr.model.lightning_model import Dsr

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo run; the defaults finish in under 10 minutes on 2 CPU cores. Widths are a quarter of
    the paper's (channels 128, codes of 128 dims, U-Net width 64), those of the shipped general VQ-VAE (1024
    codes, paper: 4096); images are 128x128 (paper: 256), where the architecture still has room at its coarsest
    grids.

    540 steps instead of the paper's hundreds of thousands, so a larger learning rate (paper: 2e-4); the paper's
    2:1 split of phases 2 and 3: 360 + 180 steps.
    """

    image_size: int = 128
    num_train: int = 80
    dsr_steps: int = 540
    batch_size: int = 8  # paper: 8
    learning_rate: float = 5e-4
    phase_ratio: float = 2.0  # paper: 2:1
    vq_weights: str | None = None  # None: the general VQ-VAE shipped with the package
    channels: int = GENERAL_VQ_WIDTHS["channels"]
    res_hidden: int = GENERAL_VQ_WIDTHS["res_hidden"]
    num_embeddings: int = GENERAL_VQ_WIDTHS["num_embeddings"]
    embedding_dim: int = GENERAL_VQ_WIDTHS["embedding_dim"]
    decoder_bottleneck: int = 16
    unet_width: int = 16
    curve_points: int = 5
    seed: int = 0

    @property
    def vq_widths(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k in GENERAL_VQ_WIDTHS}

    @property
    def dsr_kwargs(self) -> dict[str, int | float]:
        """``Dsr`` constructor arguments of these settings, all but ``vq_weights``."""
        model_keys = ("image_size", "learning_rate", "phase_ratio", "decoder_bottleneck", "unet_width")
        return {**{k: v for k, v in asdict(self).items() if k in model_keys}, **self.vq_widths}


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

    vq_file = Path(settings.vq_weights) if settings.vq_weights else GENERAL_VQ_FILE
    print(f"[2/4] General VQ-VAE: {vq_file} (trained on other photographs, see README)")

    print(f"[3/4] Training DSR: {settings.dsr_steps} steps, phases 2 and 3 in a {settings.phase_ratio:g}:1 ratio")
    model = Dsr(vq_weights=vq_file, **settings.dsr_kwargs)
    datamodule = MVTecAD(
        root=output / "data",
        category="gravel",
        train_batch_size=settings.batch_size,
        eval_batch_size=settings.batch_size,
        num_workers=0,
        seed=settings.seed,
    )
    curve = LearningCurve(settings.curve_points, output / "learning_curve.csv")
    engine = Engine(
        max_steps=settings.dsr_steps,
        callbacks=[curve],
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
    chart = save_curve_chart({"DSR": curve.rows}, output / "learning_curve.png", x="step")
    print(f"\nimage AUROC: {metrics['image_AUROC']:.3f}")
    print(f"pixel AP:    {metrics['pixel_AUPR']:.3f}   (pixel AUROC: {metrics['pixel_AUROC']:.3f})")
    print(f"\nOutputs in {output}:")
    print(f"  dataset           {output / 'data'}")
    print(f"  learning curve    {chart} (and .csv)")
    print(f"  DSR checkpoint    {results / 'weights' / 'lightning' / 'model.ckpt'}")
    print(f"  overlays (PNG)    {results / 'images'}")
    return metrics
