"""Every image under some folders, as a dataset: phase 1's own training images and ``anomalib-dsr inspect``'s test
images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data.utils import read_image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from anomalib_dsr.data.data_check import check_image_files

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageFolders(Dataset):
    """Every image under the given folders (recursively), resized to ``image_size``, RGB in [0, 1]."""

    def __init__(self, folders: Sequence[str | Path], image_size: int) -> None:
        self.image_size = image_size
        self.paths: list[Path] = []
        for folder in map(Path, folders):
            if not folder.is_dir():
                msg = f"Image folder not found: {folder}"
                raise FileNotFoundError(msg)
            self.paths += sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.paths:
            msg = f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {', '.join(map(str, folders))}."
            raise ValueError(msg)
        check_image_files(self.paths)  # every broken file named now, not one of them hours into training

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            image = read_image(path, as_tensor=True)
        except Exception as error:  # PIL raises many types for broken files
            msg = f"Cannot read image {path}: {error}"
            raise ValueError(msg) from error
        return TF.resize(image, [self.image_size, self.image_size], antialias=True)
