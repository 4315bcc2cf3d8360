"""KolektorSDD (Tabernik et al. 2019) laid out as an MVTec AD category, from a copy the user downloaded.

KolektorSDD holds 50 electrical commutators, folders ``kos01`` … ``kos50``, each with eight grey surface images
``PartN.jpg`` (500 px wide, about 1,260 px high) and their masks ``PartN_label.bmp`` (all zero for a defect-free
part); 52 of the 400 images show a defect. Layout written under ``out`` (``MVTecAD(root=out, category="kolektor")``)::

    out/kolektor/train/good/kos01_Part0.png          a seeded share of the defect-free images
    out/kolektor/test/good/kos02_Part4.png           the other defect-free images (test_good_share, default 20 %)
    out/kolektor/test/defect/kos01_Part5.png         every image with a defect
    out/kolektor/ground_truth/defect/kos01_Part5_mask.png   its mask, 0/255
    out/kolektor/KOLEKTOR_LAYOUT.json                the settings it was laid out with
    out/kolektor_val/...                             with ``val_share``: the validation split, the same layout

Images are written as PNG at their original size (the model's pre-processor resizes). The train/test split is per
image: defect-free images of one commutator can fall in train and in test. With ``val_share`` a seeded share of the
commutators is held out for validation: their images go to ``kolektor_val/test`` (defective ones, and the defect-free
ones drawn for testing), never to ``kolektor/test``, so that settings chosen on validation are tested on other parts;
``kolektor_val/train/good`` is the same training set as ``kolektor/train/good`` (hard links where the file system
allows). Files other than ``PartN.<ext>`` and
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
VAL_CATEGORY = "kolektor_val"
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
    val_good: int = 0  # out/kolektor_val/test/good
    val_defect: int = 0  # out/kolektor_val/test/defect
    val_parts: tuple[str, ...] = ()  # the commutators (kosNN) held out for validation

    def summary(self) -> str:
        verb = "Wrote" if self.written else "Already laid out with these settings:"
        lines = [
            f"{verb} {self.root}: {self.train_good} train/good, {self.test_good} test/good, "
            f"{self.test_defect} test/defect with {self.test_defect} masks in ground_truth/defect."
        ]
        if self.val_parts:
            lines.append(
                f"Validation split {self.root.with_name(VAL_CATEGORY)}: {self.val_good} test/good, {self.val_defect} "
                f"test/defect from {len(self.val_parts)} commutators ({', '.join(self.val_parts)}), none of them in "
                f"{self.root.name}/test; train/good shared."
            )
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
    src: str | Path,
    out: str | Path,
    test_good_share: float = 0.2,
    seed: int = 0,
    force: bool = False,
    val_share: float = 0.0,
) -> KolektorLayout:
    """Lay KolektorSDD from ``src`` out as ``out/kolektor`` in the MVTec AD layout (see the module docstring).

    Args:
        src: the downloaded copy, holding ``kos01`` … ``kos50``.
        out: dataset root for ``MVTecAD(root=out, category="kolektor")``.
        test_good_share: share of the defect-free images put in ``test/good`` (the rest train), drawn with ``seed``.
        seed: seed of the split.
        force: replace an ``out/kolektor`` laid out with other settings, or by hand. Without it such a folder is
            refused; one laid out from the same source with the same settings is left as it is.
        val_share: share of the commutators (whole ``kosNN`` folders, drawn with ``seed``) held out as the
            validation split ``out/kolektor_val``; 0: none.
    """
    if not 0.0 < test_good_share < 1.0:
        msg = f"test_good_share must lie in (0, 1), got {test_good_share}."
        raise KolektorError(msg)
    if not 0.0 <= val_share < 1.0:
        msg = f"val_share must lie in [0, 1), got {val_share}."
        raise KolektorError(msg)
    parts, ignored = find_parts(src)
    root, val_root = Path(out) / CATEGORY, Path(out) / VAL_CATEGORY
    settings = {"source": str(Path(src).resolve()), "test_good_share": test_good_share, "seed": seed, "layout": 1}
    if val_share:  # a layout without validation keeps the settings (and marker) it always had
        settings["val_share"] = val_share
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == settings:
        return layout(root, json.loads(marker.read_text())["counts"], ignored, written=False)
    for folder in (root, val_root):
        if folder.exists() and any(folder.iterdir()):
            if not force:
                msg = (
                    f"{folder} is not empty and was not laid out from {src} with these settings: pass --force to "
                    "replace it, or choose another OUT."
                )
                raise KolektorError(msg)
            shutil.rmtree(folder)

    masks = {part.name: read_label(part) for part in parts}
    good = [part for part in parts if not masks[part.name].any()]
    n_test = round(test_good_share * len(good))
    if not 0 < n_test < len(good):
        msg = f"test_good_share={test_good_share} of {len(good)} defect-free images leaves train or test without one."
        raise KolektorError(msg)
    order = np.random.default_rng(seed).permutation(len(good))
    test_good = {good[i].name for i in order[:n_test]}
    val_parts = validation_commutators(parts, masks, val_share, seed)
    for part in parts:
        held_out = val_root if commutator(part) in val_parts else root
        if masks[part.name].any():
            folder, subfolder = held_out, "test/defect"
            mask = Image.fromarray(masks[part.name].astype(np.uint8) * 255)
            mask.save(_mkdir(folder / "ground_truth/defect") / f"{part.name}_mask.png")
        else:
            folder, subfolder = (held_out, "test/good") if part.name in test_good else (root, "train/good")
        with Image.open(part.image) as image:
            image.save(_mkdir(folder / subfolder) / f"{part.name}.png")
    counts = {name: len(list((root / sub).glob("*.png"))) for name, sub in LAYOUT_COUNTS.items()}
    if val_parts:
        for image in sorted((root / "train/good").glob("*.png")):
            _link_or_copy(image, _mkdir(val_root / "train/good") / image.name)
        counts |= {name: len(list((val_root / sub).glob("*.png"))) for name, sub in VAL_COUNTS.items()}
        counts["val_parts"] = sorted(val_parts)
    marker.write_text(json.dumps({"settings": settings, "counts": counts}, indent=2))
    return layout(root, counts, ignored, written=True)


LAYOUT_COUNTS = {"train_good": "train/good", "test_good": "test/good", "test_defect": "test/defect"}
VAL_COUNTS = {"val_good": "test/good", "val_defect": "test/defect"}


def layout(root: Path, counts: dict, ignored: list[str], written: bool) -> KolektorLayout:
    """The :class:`KolektorLayout` of ``counts`` as the marker keeps them."""
    val_parts = tuple(counts.pop("val_parts", ()))
    return KolektorLayout(root, **counts, ignored=tuple(ignored), written=written, val_parts=val_parts)


def commutator(part: KolektorPart) -> str:
    """The commutator (``kosNN`` folder) a part image shows."""
    return part.name.split("_")[0]


def validation_commutators(
    parts: list[KolektorPart], masks: dict[str, np.ndarray], share: float, seed: int
) -> set[str]:
    """A seeded ``share`` of the commutators, drawn apart from the train/test draw (which stays as without
    validation); refused when the validation or the test split would hold no defective image."""
    if not share:
        return set()
    names = sorted({commutator(part) for part in parts})
    count = round(share * len(names))
    chosen = {names[i] for i in np.random.default_rng([seed, 1]).permutation(len(names))[:count]}
    defective = {commutator(part) for part in parts if masks[part.name].any()}
    if not chosen & defective or not defective - chosen:
        msg = (
            f"val_share={share} holds out {count} of {len(names)} commutators ({', '.join(sorted(chosen)) or 'none'}),"
            f" leaving the validation or the test split without a defective image: choose another share or seed."
        )
        raise KolektorError(msg)
    return chosen


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        target.hardlink_to(source)
    except OSError:  # another file system, or no hard links
        shutil.copyfile(source, target)


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder
