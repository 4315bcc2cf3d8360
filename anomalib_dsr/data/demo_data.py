"""A small MVTec-AD-layout dataset built offline from texture photographs that scikit-image ships.

Normal images are random crops (flipped and rotated by multiples of 90°) of one photo; defects are
pasted patches of another texture with a random tint ("contamination") and thin coloured strokes
("scratch"), each with its pixel mask. Layout::

    root/<category>/train/good/000.png
    root/<category>/test/{good,contamination,scratch}/000.png
    root/<category>/ground_truth/{contamination,scratch}/000_mask.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata
from skimage import draw

TEXTURES = ("gravel", "grass", "brick")
DEFECTS = ("contamination", "scratch")


def _texture(name: str) -> np.ndarray:
    if name not in TEXTURES:
        msg = f"Unknown demo texture {name!r}; choose one of {TEXTURES}."
        raise ValueError(msg)
    return getattr(skdata, name)()  # (512, 512) uint8 photograph


def _crop(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
    patch = np.rot90(photo[y : y + size, x : x + size], k=rng.integers(4))
    patch = patch[:, ::-1] if rng.random() < 0.5 else patch
    return np.repeat(patch[..., None], 3, axis=2).astype(np.float32) / 255.0


def _defect(
    rng: np.random.Generator, image: np.ndarray, kind: str, source: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    mask = np.zeros((size, size), dtype=bool)
    colour = rng.uniform(0.1, 1.0, size=3).astype(np.float32)
    if kind == "contamination":
        rr, cc = draw.ellipse(
            rng.uniform(0.2, 0.8) * size,
            rng.uniform(0.2, 0.8) * size,
            rng.uniform(0.07, 0.2) * size,
            rng.uniform(0.07, 0.2) * size,
            shape=mask.shape,
            rotation=rng.uniform(0, np.pi),
        )
        mask[rr, cc] = True
        fill = _crop(rng, source, size) * colour
    else:  # scratch: a thin quadrilateral stroke
        y0, x0 = rng.uniform(0.15, 0.85, size=2) * size
        angle, length, width = rng.uniform(0, np.pi), rng.uniform(0.3, 0.6) * size, rng.uniform(0.02, 0.04) * size
        dy, dx = np.sin(angle) * length, np.cos(angle) * length
        ny, nx = np.cos(angle) * width, -np.sin(angle) * width
        rr, cc = draw.polygon(
            [y0, y0 + dy, y0 + dy + ny, y0 + ny], [x0, x0 + dx, x0 + dx + nx, x0 + nx], shape=mask.shape
        )
        mask[rr, cc] = True
        fill = np.broadcast_to(colour, image.shape)
    out = image.copy()
    out[mask] = fill[mask]
    return out, mask


def _save(array: np.ndarray, path: Path, size: int, mask: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray((array * 255).astype(np.uint8)) if not mask else Image.fromarray(array.astype(np.uint8) * 255)
    img.resize((size, size), Image.NEAREST if mask else Image.BILINEAR).save(path)


def make_demo_dataset(
    root: str | Path,
    category: str = "gravel",
    image_size: int = 64,
    num_train: int = 80,
    num_test_good: int = 16,
    num_test_defect: int = 12,
    crop: int = 128,
    seed: int = 0,
) -> Path:
    """Write the dataset under ``root/category`` (idempotent for the same arguments); returns that folder.

    Args:
        root: dataset root, as for ``anomalib.data.MVTecAD(root=...)``.
        category: the texture photo for normal images: one of ``gravel``, ``grass``, ``brick``.
        image_size: side of the saved images.
        num_train / num_test_good / num_test_defect: image counts (the last per defect type).
        crop: side of the crops taken from the 512x512 photo before resizing.
        seed: seed of the generator.
    """
    rng = np.random.default_rng(seed)
    photo = _texture(category)
    source = _texture(next(t for t in TEXTURES if t != category))
    folder = Path(root) / category
    for i in range(num_train):
        _save(_crop(rng, photo, crop), folder / "train" / "good" / f"{i:03d}.png", image_size)
    for i in range(num_test_good):
        _save(_crop(rng, photo, crop), folder / "test" / "good" / f"{i:03d}.png", image_size)
    for kind in DEFECTS:
        for i in range(num_test_defect):
            image, mask = _defect(rng, _crop(rng, photo, crop), kind, source)
            _save(image, folder / "test" / kind / f"{i:03d}.png", image_size)
            _save(mask, folder / "ground_truth" / kind / f"{i:03d}_mask.png", image_size, mask=True)
    return folder
