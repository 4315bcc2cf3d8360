"""A cheap scan of a datamodule's files before training, so that bad input fails in seconds, not hours.

Every image and mask of the train, validation and test sets is opened with PIL: the header, plus
``verify()`` (checksums of PNG chunks; for a JPEG, the end-of-image marker, decoding the file only when
the marker is missing). All problems are reported together in one :class:`DataError`, one line per file.
What anomalib converts on its own is accepted: grayscale, palette, RGBA and 16-bit images (read as RGB),
mixed image sizes (resized when batched, then by the pre-processor).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

MAX_LISTED = 50  # problems listed in one error message; the rest are counted
_JPEG_TAIL = 4096  # bytes searched for the end-of-image marker


class DataError(ValueError):
    """Dataset files that DSR cannot train or test on; the message names every file and its problem."""


def image_problem(path: str | Path) -> tuple[tuple[int, int] | None, str | None]:
    """``((width, height), None)`` for a readable image, ``(None, problem)`` otherwise."""
    path = Path(path)
    if not path.is_file():
        return None, "file not found"
    size_bytes = path.stat().st_size
    if size_bytes == 0:
        return None, "zero-byte file"
    try:
        with Image.open(path) as image:
            size, fmt = image.size, image.format
            image.verify()
        if fmt == "JPEG":
            with path.open("rb") as file:
                file.seek(max(0, size_bytes - _JPEG_TAIL))
                complete = b"\xff\xd9" in file.read()
            if not complete:  # no end-of-image marker near the end: decode to know
                with Image.open(path) as image:
                    image.load()
    except UnidentifiedImageError:
        return None, "not an image (PIL cannot identify its format)"
    except Exception as error:  # PIL raises SyntaxError, OSError, ValueError, struct.error, ... for broken files
        return None, f"truncated or corrupt image ({type(error).__name__}: {error})"
    return size, None


def _raise_problems(problems: list[str], checked: int) -> None:
    if problems:
        listed = problems[:MAX_LISTED]
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        msg = (
            f"{len(problems)} of {checked} dataset files cannot be used; fix or remove them before training:\n  "
            + "\n  ".join(listed)
            + more
        )
        raise DataError(msg)


def check_image_files(paths: Iterable[str | Path]) -> int:
    """Open every file of ``paths`` as an image; one :class:`DataError` names all broken ones."""
    start = time.perf_counter()
    paths = list(paths)
    problems = [f"{path}: {problem}" for path in paths if (problem := image_problem(path)[1])]
    _raise_problems(problems, len(paths))
    logger.info("Checked %d image files in %.1f s: all readable.", len(paths), time.perf_counter() - start)
    return len(paths)


def _samples(dataset: Any) -> Iterable[tuple[str, str]]:
    """(image path, mask path or '') for each sample of an anomalib dataset."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return []
    masks = samples["mask_path"] if "mask_path" in samples.columns else [""] * len(samples)
    return [(str(i), "" if not isinstance(m, str) else m) for i, m in zip(samples["image_path"], masks, strict=True)]


def train_folder(datamodule: Any) -> str:
    """Best guess of where a datamodule looks for its training images, for error messages."""
    root = getattr(datamodule, "root", None)
    normal_dir = getattr(datamodule, "normal_dir", None)
    if normal_dir is not None:
        return str(
            Path(root) / normal_dir if root is not None and not Path(str(normal_dir)).is_absolute() else normal_dir
        )
    category = getattr(datamodule, "category", None)
    if root is not None and category:
        return str(Path(root) / category / "train")
    return str(root) if root is not None else type(datamodule).__name__


def check_datamodule(
    datamodule: Any, transform: Any = None, check_size: Callable[[int, int], None] | None = None
) -> int:
    """Scan the train/val/test files of a set-up anomalib datamodule; return how many files were checked.

    Raises :class:`DataError` for an empty training set, unreadable images or masks, and masks whose
    size differs from their image's; ``ValueError`` (from ``check_size``, the model's check of a ``height,
    width``) when a subset's augmentations followed by ``transform`` (the pre-processor's; ``None``: none) turn
    some image size into one the model cannot process.
    """
    start = time.perf_counter()
    train = getattr(datamodule, "train_data", None)
    if train is not None and len(train) == 0:
        msg = (
            f"The training set is empty: no images found for {type(datamodule).__name__} in "
            f"{train_folder(datamodule)}. "
            "Put normal images there (anomalib's extensions for this datamodule) or fix root/category/normal_dir."
        )
        raise DataError(msg)

    problems: list[str] = []
    sizes: dict[tuple[tuple[int, int], str], str] = {}  # (image size, subset) -> first file of that size
    seen: set[str] = set()
    for subset in ("train_data", "val_data", "test_data"):
        for image_path, mask_path in _samples(getattr(datamodule, subset, None)):
            if image_path in seen:
                continue
            seen.add(image_path)
            size, problem = image_problem(image_path)
            if problem:
                problems.append(f"{image_path}: {problem}")
            elif size is not None:
                sizes.setdefault((size, subset), image_path)
            if not mask_path or mask_path in seen:
                continue
            seen.add(mask_path)
            mask_size, mask_issue = image_problem(mask_path)
            if mask_issue:
                problems.append(f"{mask_path} (mask of {image_path}): {mask_issue}")
            elif size is not None and mask_size != size:
                problems.append(
                    f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} (WxH) but its image {image_path} is "
                    f"{size[0]}x{size[1]}; resize the mask to its image's size (nearest neighbour) or fix the pairing"
                )
    _raise_problems(problems, len(seen))

    for ((width, height), subset), example in sizes.items() if check_size is not None else ():
        out = torch.zeros(3, height, width)
        augmentations = getattr(getattr(datamodule, subset, None), "augmentations", None)
        for step in (augmentations, transform):
            if step is not None:
                out = step(out)
        out = out.shape[-2:]
        try:
            check_size(*out)
        except ValueError as error:
            msg = f"{example} ({width}x{height}, WxH) becomes {tuple(out)} before the model. {error}"
            raise ValueError(msg) from None
    distinct = sorted({size for size, _ in sizes})
    if len(distinct) > 1:
        logger.info(
            "Dataset images come in %d sizes (e.g. %s); each batch is resized to one size.", len(distinct), distinct[:3]
        )
    logger.info("Checked %d dataset files in %.1f s: all readable.", len(seen), time.perf_counter() - start)
    return len(seen)
