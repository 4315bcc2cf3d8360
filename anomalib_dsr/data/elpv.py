"""The ELPV solar-cell dataset as anomalib ``Folder`` datasets, one per cell type (real defects, no masks).

ELPV (Buerhop-Lutz et al. 2018; Deitsch et al. 2019) holds 2,624 electroluminescence images of solar cells,
300x300 grey, each with a defect probability (0, 1/3, 2/3 or 1) and a cell type (mono- or polycrystalline).
It is installed with ``pip install elpv-dataset`` (CC BY-NC-SA 4.0: it is laid out on the user's disk, never
shipped with this package). Layout written under ``root``::

    root/<type>/train/good/cellNNNN.png     a share of the p = 0 cells
    root/<type>/test/good/cellNNNN.png      the other p = 0 cells
    root/<type>/test/defect/cellNNNN.png    the p = 1 cells (1/3 and 2/3 are left out as uncertain)
    root/<type>/val/{good,defect}/…         with ``max_test_per_class``: the p = 0 and p = 1 cells beyond the
                                            test cap, disjoint from train and test, for choosing settings
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

CELL_TYPES = ("mono", "poly")
MARKER = "ELPV_LAYOUT.json"


def prepare_elpv(
    root: str | Path,
    train_share: float = 0.8,
    max_test_per_class: int | None = None,
    seed: int = 0,
) -> Path:
    """Lay ELPV out under ``root`` (idempotent for the same arguments); returns ``root``.

    Args:
        root: output folder.
        train_share: share of each type's p = 0 cells used for training; the rest are the good test cells.
        max_test_per_class: at most this many good and this many defective test cells per type, drawn at
            random (``None``: all), to bound test time on a CPU; the cells beyond the cap go to ``val/``.
        seed: seed of the split.
    """
    try:
        import elpv_dataset  # noqa: PLC0415
    except ImportError as error:
        msg = "The ELPV dataset is not installed: `pip install elpv-dataset` (CC BY-NC-SA 4.0, about 90 MB)."
        raise ImportError(msg) from error
    if not 0.0 < train_share < 1.0:
        msg = f"train_share must lie in (0, 1), got {train_share}."
        raise ValueError(msg)
    root = Path(root)
    settings = {"train_share": train_share, "max_test_per_class": max_test_per_class, "seed": seed, "layout": 2}
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    data = np.genfromtxt(labels, dtype=["U32", "f8", "U4"], names=["path", "probability", "type"])
    rng = np.random.default_rng(seed)
    for cell_type in CELL_TYPES:
        folder = root / cell_type
        shutil.rmtree(folder, ignore_errors=True)
        of_type = data[data["type"] == cell_type]
        good = rng.permutation(of_type["path"][of_type["probability"] == 0])
        defect = rng.permutation(of_type["path"][of_type["probability"] == 1])
        n_train = round(train_share * len(good))
        split = {"train/good": good[:n_train], "test/good": good[n_train:], "test/defect": defect}
        if max_test_per_class is not None:
            cap = max_test_per_class
            split |= {"test/good": good[n_train : n_train + cap], "test/defect": defect[:cap]}
            split |= {"val/good": good[n_train + cap :], "val/defect": defect[cap:]}
        for subfolder, paths in split.items():
            (folder / subfolder).mkdir(parents=True, exist_ok=True)
            for path in paths:
                shutil.copyfile(labels.parent / path, folder / subfolder / Path(path).name)
    marker.write_text(json.dumps(settings))
    return root
