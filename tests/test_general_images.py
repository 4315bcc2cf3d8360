"""The general image source of phase 1 (no download, augmented, disjoint from the demo) and the shipped VQ-VAE."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from anomalib_dsr.data.demo_data import TEXTURES, _texture
from anomalib_dsr.data.general_images import (
    GENERAL_VQ_FILE,
    GENERAL_VQ_WIDTHS,
    GeneralImages,
    general_photos,
    photo_names,
)
from anomalib_dsr.model.original_format import VQ_FORMAT, load_original_state, read_state_dict
from anomalib_dsr.model.vq_vae import GeneralVQVAE
from anomalib_dsr.workflows.demo import DemoSettings


def test_photos_load_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the general image source tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    general_photos.cache_clear()
    photos = general_photos()
    assert len(photos) == len(photo_names()) >= 15
    for photo in photos:
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3 and min(photo.shape[:2]) >= 100


def test_source_is_disjoint_from_the_demo_textures() -> None:
    """Neither the demo's normal texture (gravel) nor its defect sources (grass, and brick) are in the source,
    by name or by content (no photo holds a 64x64 block of a texture)."""
    assert not {name.split(":")[1] for name in photo_names()} & set(TEXTURES)
    for texture in TEXTURES:
        block = _texture(texture)[200:264, 200:264].astype(np.int16)
        for name, photo in zip(photo_names(), general_photos(), strict=True):
            grey = photo.mean(axis=2)
            if photo.shape[0] < 64 or photo.shape[1] < 64:
                continue
            # The texture block, if present anywhere, would match one window exactly: compare each window's mean.
            windows = np.lib.stride_tricks.sliding_window_view(grey, (64, 64))[::8, ::8]
            assert np.abs(windows - block).mean(axis=(2, 3)).min() > 5, f"{name} contains {texture}"


def test_augmentations_widen_appearance() -> None:
    torch.manual_seed(0)
    images = torch.stack([GeneralImages(64, length=200)[i] for i in range(200)])
    assert images.shape == (200, 3, 64, 64)
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    grey = (images[:, 0] == images[:, 1]).all(dim=(1, 2)) & (images[:, 1] == images[:, 2]).all(dim=(1, 2))
    # Grey photographs (camera, moon, ...) and grey conversion (p = 0.2) give grey crops; colour jitter the rest.
    assert 0.2 < grey.float().mean() < 0.8
    # Random-scale crops: some crops are nearly flat close-ups, others hold a whole photograph's detail.
    detail = images.std(dim=(1, 2, 3))
    assert detail.min() < 0.05 and detail.max() > 0.2
    # Hue jitter and channel permutation: the dominant channel of colour crops varies.
    colour = images[~grey].mean(dim=(2, 3))
    assert len(set(colour.argmax(dim=1).tolist())) == 3
    # Two draws of the same index differ (augmentation per draw), and a seed reproduces them.
    torch.manual_seed(1)
    first = GeneralImages(64, length=1)[0]
    torch.manual_seed(1)
    assert torch.equal(first, GeneralImages(64, length=1)[0])  # exact by construction: same draws, same kernels
    assert not torch.equal(first, GeneralImages(64, length=1)[0])


def test_shipped_general_vq_loads_and_is_what_the_demo_uses() -> None:
    """The package ships a general VQ-VAE of a few MB at the demo's widths that uses a wide share of its codes."""
    assert GENERAL_VQ_FILE.is_file() and GENERAL_VQ_FILE.stat().st_size < 4 * 2**20
    settings = DemoSettings()
    assert settings.vq_weights is None and settings.vq_widths == GENERAL_VQ_WIDTHS
    model = GeneralVQVAE(**GENERAL_VQ_WIDTHS)
    load_original_state(model, read_state_dict(GENERAL_VQ_FILE), VQ_FORMAT, GENERAL_VQ_FILE)
    model.eval()
    torch.manual_seed(0)
    images = torch.stack([GeneralImages(128, length=32)[i] for i in range(32)])
    with torch.no_grad():
        reconstruction, lo, hi = model(images.flip(1))
    assert torch.nn.functional.mse_loss(reconstruction, images.flip(1)) < 0.01
    k = GENERAL_VQ_WIDTHS["num_embeddings"]
    assert lo.indices.unique().numel() > 0.3 * k and hi.indices.unique().numel() > 0.3 * k
