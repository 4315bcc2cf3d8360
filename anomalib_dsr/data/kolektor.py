"""KolektorSDD (Tabernik et al. 2019) laid out as an MVTec AD category, from a copy the user downloaded.

KolektorSDD holds 50 electrical commutators, folders ``kos01`` … ``kos50``, each with eight grey surface images
``PartN.jpg`` (500 px wide, about 1,260 px high) and their masks ``PartN_label.bmp`` (all zero for a defect-free
part); 52 of the 400 images show a defect. Layout written under ``out`` (``MVTecAD(root=out, category="kolektor")``)::

    out/kolektor/train/good/kos01_Part0.png          a seeded share of the defect-free images
    out/kolektor/test/good/kos02_Part4.png           the other defect-free images (test_good_share, default 20 %)
    out/kolektor/test/defect/kos01_Part5.png         every image with a defect
    out/kolektor/ground_truth/defect/kos01_Part5_mask.png   its mask, 0/255
    out/kolektor/KOLEKTOR_LAYOUT.json                the settings it was laid out with

Images are written as PNG at their original size (the model's pre-processor resizes). The split is per image:
defect-free images of one commutator can fall in train and in test. Files other than ``PartN.<ext>`` and
``PartN_label.<ext>``, and nested folders (the public archive has a copy of ``kos08`` inside ``kos13``), are ignored.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORY = "kolektor"
MARKER = "KOLEKTOR_LAYOUT.json"
FOLDER_PATTERN = re.compile(r"kos\d+")
IMAGE_PATTERN = re.compile(r"(Part\d+)\.(jpg|jpeg|png|bmp)", re.IGNORECASE)
LABEL_PATTERN = re.compile(r"(Part\d+)_label\.(bmp|png)", re.IGNORECASE)


class KolektorError(ValueError):
    """The source is not a usable KolektorSDD copy, or the output would be overwritten: the message says which path."""


@dataclass(frozen=True)
class KolektorPart:
    """One image of the source with its label, ``name`` as written (``kos01_Part3``)."""

    image: Path
    label: Path
    name: str


@dataclass(frozen=True)
class KolektorLayout:
    """What :func:`prepare_kolektor` laid out (or found already laid out, ``written=False``)."""

    root: Path  # out/kolektor
    train_good: int
    test_good: int
    test_defect: int
    ignored: tuple[str, ...]  # source entries that are not part images or labels
    written: bool

    def summary(self) -> str:
        verb = "Wrote" if self.written else "Already laid out with these settings:"
        lines = [
            f"{verb} {self.root}: {self.train_good} train/good, {self.test_good} test/good, "
            f"{self.test_defect} test/defect with {self.test_defect} masks in ground_truth/defect."
        ]
        if self.ignored:
            shown = ", ".join(self.ignored[:5]) + (" ..." if len(self.ignored) > 5 else "")
            lines.append(f"Not part images or labels, ignored ({len(self.ignored)}): {shown}")
        return "\n".join(lines)


def find_parts(src: str | Path) -> tuple[list[KolektorPart], list[str]]:
    """The image/label pairs of the ``kosNN`` folders of ``src`` (sorted) and the entries ignored there.

    Raises :class:`KolektorError` naming every image without its label and every label without its image.
    """
    src = Path(src)
    if not src.is_dir():
        msg = f"KolektorSDD folder {src} does not exist: give the unpacked download, the folder with kos01 … kos50."
        raise KolektorError(msg)
    folders = sorted(p for p in src.iterdir() if p.is_dir() and FOLDER_PATTERN.fullmatch(p.name))
    if not folders:
        msg = f"{src} holds no kosNN folders: give the unpacked KolektorSDD folder that holds kos01 … kos50."
        raise KolektorError(msg)
    parts, ignored, unpaired = [], [], []
    for folder in folders:
        images, labels = {}, {}
        for entry in sorted(folder.iterdir()):
            if entry.is_file() and (match := IMAGE_PATTERN.fullmatch(entry.name)):
                images[match[1]] = entry
            elif entry.is_file() and (match := LABEL_PATTERN.fullmatch(entry.name)):
                labels[match[1]] = entry
            else:
                ignored.append(str(entry.relative_to(src)))
        unpaired += [f"{images[p]} has no label {p}_label.bmp" for p in sorted(images.keys() - labels.keys())]
        unpaired += [f"{labels[p]} has no image {p}.jpg" for p in sorted(labels.keys() - images.keys())]
        paired = sorted(images.keys() & labels.keys())
        parts += [KolektorPart(images[p], labels[p], f"{folder.name}_{p}") for p in paired]
    if unpaired:
        msg = f"Every KolektorSDD image needs its label and vice versa: {'; '.join(unpaired)}."
        raise KolektorError(msg)
    return parts, ignored


def read_label(part: KolektorPart) -> np.ndarray:
    """The part's mask ``(H, W)`` bool, checked against its image's size. Palette labels are read by colour."""
    with Image.open(part.label) as label, Image.open(part.image) as image:
        if label.size != image.size:
            msg = (
                f"Label {part.label} is {label.size[0]}x{label.size[1]} but image {part.image} is "
                f"{image.size[0]}x{image.size[1]} (W x H): they must match."
            )
            raise KolektorError(msg)
        return np.asarray(label.convert("L")) > 0


def prepare_kolektor(
    src: str | Path, out: str | Path, test_good_share: float = 0.2, seed: int = 0, force: bool = False
) -> KolektorLayout:
    """Lay KolektorSDD from ``src`` out as ``out/kolektor`` in the MVTec AD layout (see the module docstring).

    Args:
        src: the downloaded copy, holding ``kos01`` … ``kos50``.
        out: dataset root for ``MVTecAD(root=out, category="kolektor")``.
        test_good_share: share of the defect-free images put in ``test/good`` (the rest train), drawn with ``seed``.
        seed: seed of the split.
        force: replace an ``out/kolektor`` laid out with other settings, or by hand. Without it such a folder is
            refused; one laid out from the same source with the same settings is left as it is.
    """
    if not 0.0 < test_good_share < 1.0:
        msg = f"test_good_share must lie in (0, 1), got {test_good_share}."
        raise KolektorError(msg)
    parts, ignored = find_parts(src)
    root = Path(out) / CATEGORY
    settings = {"source": str(Path(src).resolve()), "test_good_share": test_good_share, "seed": seed, "layout": 1}
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == settings:
        counts = json.loads(marker.read_text())["counts"]
        return KolektorLayout(root, **counts, ignored=tuple(ignored), written=False)
    if root.exists() and any(root.iterdir()):
        if not force:
            msg = (
                f"{root} is not empty and was not laid out from {src} with these settings: pass --force to replace "
                "it, or choose another OUT."
            )
            raise KolektorError(msg)
        shutil.rmtree(root)

    masks = {part.name: read_label(part) for part in parts}
    good = [part for part in parts if not masks[part.name].any()]
    n_test = round(test_good_share * len(good))
    if not 0 < n_test < len(good):
        msg = f"test_good_share={test_good_share} of {len(good)} defect-free images leaves train or test without one."
        raise KolektorError(msg)
    order = np.random.default_rng(seed).permutation(len(good))
    test_good = {good[i].name for i in order[:n_test]}
    for part in parts:
        if masks[part.name].any():
            subfolder = "test/defect"
            mask = Image.fromarray(masks[part.name].astype(np.uint8) * 255)
            mask.save(_mkdir(root / "ground_truth/defect") / f"{part.name}_mask.png")
        else:
            subfolder = "test/good" if part.name in test_good else "train/good"
        with Image.open(part.image) as image:
            image.save(_mkdir(root / subfolder) / f"{part.name}.png")
    counts = {"train_good": len(good) - n_test, "test_good": n_test, "test_defect": len(parts) - len(good)}
    marker.write_text(json.dumps({"settings": settings, "counts": counts}, indent=2))
    return KolektorLayout(root, **counts, ignored=tuple(ignored), written=True)


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder
