"""Shared fixtures: a tiny MVTec-layout dataset, a tiny pretrained VQ-VAE file and tiny model widths.

Everything is sized for a 2-core CPU: 64x64 images (the smallest square size DSR accepts: sides must be
multiples of 32, not both 32), VQ width 16, 32 codes, U-Net width 8.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

# One intra-op thread: on a small shared CPU, torch's default thread pool oversubscribes the cores and
# makes these tiny models about 100x slower.
torch.set_num_threads(1)

IMAGE_SIZE = 64
CATEGORY = "gravel"

# Widths of the general VQ-VAE (must match the VQ weights file written below).
VQ_WIDTHS = {"channels": 16, "res_hidden": 8, "num_embeddings": 32, "embedding_dim": 16}
# Widths of the whole DSR model.
TINY_WIDTHS = {**VQ_WIDTHS, "decoder_bottleneck": 8, "unet_width": 8}
# Trainer settings of every run here: quiet, and on the CPU (deterministic; tiny models gain nothing on a GPU).
TRAINER_KWARGS = {"enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu"}


@pytest.fixture(scope="session")
def tiny_widths() -> dict[str, int]:
    """Constructor kwargs of ``Dsr``/``DsrModel`` for a tiny model (shared: copy before changing it)."""
    return dict(TINY_WIDTHS)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny MVTec-layout dataset: ``root/gravel/{train,test,ground_truth}``, 64x64 images."""
    from anomalib_dsr.data.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("demo_data")
    make_demo_dataset(root, category=CATEGORY, image_size=IMAGE_SIZE, num_train=8, num_test_good=4, num_test_defect=2)
    return root


@pytest.fixture(scope="session")
def vq_weights(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> Path:
    """A tiny general VQ-VAE, briefly pretrained on the demo train images, in the original layout."""
    from anomalib_dsr.workflows.pretrain_vq import pretrain_vq

    out = tmp_path_factory.mktemp("vq") / "vq_tiny.pckl"
    return pretrain_vq(
        [demo_root / CATEGORY / "train" / "good"],
        out,
        image_size=IMAGE_SIZE,
        max_steps=6,
        batch_size=4,
        resume=False,
        trainer_kwargs=dict(TRAINER_KWARGS),
        **VQ_WIDTHS,
    )


@pytest.fixture
def make_dsr(vq_weights: Path, tiny_widths: dict[str, int]):
    """Factory for a tiny ``Dsr`` on 64x64 inputs loading the session's VQ weights; kwargs override."""
    from anomalib_dsr import Dsr

    def make(**overrides):
        kwargs = {
            "vq_weights": vq_weights,
            "pre_processor": Dsr.configure_pre_processor((IMAGE_SIZE, IMAGE_SIZE)),
            "visualizer": False,
            **tiny_widths,
            **overrides,
        }
        return Dsr(**kwargs)

    return make


@pytest.fixture
def force_algorithms():
    """Fix inference's timed layers to given algorithms (``anomalib_dsr.model.layers.fixed_algorithms``) for the
    test: ``force_algorithms(*names, nnpack=False)`` gives each layer the first of ``names`` it is offered, else its
    own (the first it lists), and NNPACK sections only if ``nnpack``."""
    from contextlib import ExitStack

    from anomalib_dsr.model.layers import fixed_algorithms

    with ExitStack() as stack:
        yield lambda *names, nnpack=False: stack.enter_context(fixed_algorithms(*names, nnpack=nnpack))


@pytest.fixture
def make_datamodule(demo_root: Path):
    """Factory for ``anomalib.data.MVTecAD`` on the demo dataset (no workers)."""
    from anomalib.data import MVTecAD

    def make(**overrides):
        kwargs = {
            "root": demo_root,
            "category": CATEGORY,
            "train_batch_size": 4,
            "eval_batch_size": 4,
            "num_workers": 0,
            **overrides,
        }
        return MVTecAD(**kwargs)

    return make


class StopAt(Callback):
    """Stops training once ``global_step`` reaches ``step`` (an interrupted run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
