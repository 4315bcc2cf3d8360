"""A general image source for phase 1 that needs no download: the photographs installed packages ship.

DSR's premise is a *general* VQ-VAE that represents any appearance, so that I_gen keeps a defect that I_spc
removes (the paper trains it on ImageNet). Offline, the widest source at hand is the set of photographs that
scikit-image, scikit-learn and matplotlib install (portraits, animals, food, a rocket, microscopy, space,
retina, text), widened by augmentation: random-scale crops, flips, rotations, colour and hue jitter, channel
permutations and grey conversion.

The demo's textures (``gravel``, ``grass``, ``brick``: normal images and defect sources) are never used, so a
VQ-VAE trained here has not seen what the demo evaluates.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

SKIMAGE_PHOTOS = (
    "astronaut", "camera", "cell", "chelsea", "clock", "coffee", "coins", "hubble_deep_field",
    "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
)  # fmt: skip
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)


def _rgb(photo: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3|4)`` uint8 → ``(H, W, 3)`` uint8."""
    photo = np.asarray(photo)
    return np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else np.ascontiguousarray(photo[..., :3])


def photo_names() -> tuple[str, ...]:
    """Names of the photographs in :func:`general_photos`, in its order (``package:name``)."""
    return (
        *(f"skimage:{n}" for n in SKIMAGE_PHOTOS),
        *(f"sklearn:{n}" for n in SKLEARN_PHOTOS),
        *(f"matplotlib:{n}" for n in MATPLOTLIB_PHOTOS),
        "skimage:stereo_motorcycle",
    )


@cache
def general_photos() -> tuple[np.ndarray, ...]:
    """The photographs, each ``(H, W, 3)`` uint8 RGB, read from the installed packages (no network)."""
    import matplotlib  # noqa: PLC0415 - anomalib's dependencies; imported only when needed
    import sklearn.datasets  # noqa: PLC0415
    from skimage import data as skdata  # noqa: PLC0415

    photos = [_rgb(getattr(skdata, name)()) for name in SKIMAGE_PHOTOS]
    sklearn_images = Path(sklearn.datasets.__file__).parent / "images"
    photos += [_rgb(np.asarray(Image.open(sklearn_images / name))) for name in SKLEARN_PHOTOS]
    sample_data = Path(matplotlib.get_data_path()) / "sample_data"
    photos += [_rgb(np.asarray(Image.open(sample_data / name))) for name in MATPLOTLIB_PHOTOS]
    photos.append(_rgb(skdata.stereo_motorcycle()[0]))
    return tuple(photos)


def augmentation(image_size: int) -> v2.Compose:
    """Random-scale crop to ``image_size``, flips, colour and hue jitter, channel permutation, grey conversion
    (rotations by multiples of 90° are drawn in :class:`GeneralImages`); uint8 ``(3, H, W)`` → float ``(3, image_size,
    image_size)`` in [0, 1]."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.01, 1.0), ratio=(0.75, 1.333), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply([v2.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.8, hue=0.5)], p=0.8),
            v2.RandomApply([v2.RandomChannelPermutation()], p=0.5),
            v2.RandomGrayscale(p=0.2),
        ]
    )


class GeneralImages(Dataset):
    """``length`` augmented crops ``(3, image_size, image_size)`` in [0, 1], RGB, of the general photographs.

    Each item draws a photograph and its augmentation from torch's global RNG, so ``seed_everything`` makes
    a pretraining run reproducible.
    """

    def __init__(self, image_size: int, length: int = 100_000) -> None:
        self.photos = [torch.from_numpy(photo).permute(2, 0, 1).contiguous() for photo in general_photos()]
        self.transform = augmentation(image_size)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        del index
        photo = self.photos[int(torch.randint(len(self.photos), ()))]
        return torch.rot90(self.transform(photo), int(torch.randint(4, ())), dims=(1, 2))


# A small general VQ-VAE trained on these photographs ships with the package (quarter of the paper's widths).
# Reproduce it with (about 11 min on 2 CPU cores):
#   anomalib-dsr pretrain-vq --general --image-size 128 --max-steps 3000 --batch-size 16 --num-workers 0 \
#       --channels 32 --res-hidden 16 --num-embeddings 1024 --embedding-dim 32 --seed 0 --no-resume \
#       --output anomalib_dsr/weights/vq_general_32_1024.pckl
GENERAL_VQ_FILE = Path(__file__).parents[1] / "weights" / "vq_general_32_1024.pckl"
GENERAL_VQ_WIDTHS = {"channels": 32, "res_hidden": 16, "num_embeddings": 1024, "embedding_dim": 32}
