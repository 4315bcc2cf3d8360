"""ELPV laid out as Folder datasets per cell type, from the installed ``elpv-dataset`` package's files.

The real package (90 MB) is not a test dependency: a stand-in with its file layout (``data/labels.csv`` with
path, probability and type columns, ``data/images/*.png``) is put on ``sys.path``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_dsr.data.elpv import prepare_elpv

# (type, probability) → count in the stand-in
COUNTS = {
    ("mono", 0.0): 10,
    ("mono", 1.0): 6,
    ("mono", 1 / 3): 3,
    ("poly", 0.0): 20,
    ("poly", 1.0): 4,
    ("poly", 2 / 3): 2,
}


@pytest.fixture
def elpv_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    package = tmp_path / "site" / "elpv_dataset"
    (package / "data" / "images").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    lines, index = [], 0
    for (cell_type, probability), count in COUNTS.items():
        for _ in range(count):
            index += 1
            name = f"images/cell{index:04d}.png"
            Image.fromarray(np.full((30, 30), index, dtype=np.uint8)).save(package / "data" / name)
            lines.append(f"{name} {probability:.16f} {cell_type}")
    (package / "data" / "labels.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.delitem(sys.modules, "elpv_dataset", raising=False)
    return package


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.png")}


def test_layout_per_cell_type(elpv_package: Path, tmp_path: Path) -> None:
    root = prepare_elpv(tmp_path / "elpv", train_share=0.8, seed=0)
    for cell_type in ("mono", "poly"):
        train, good, defect = (files(root / cell_type / sub) for sub in ("train/good", "test/good", "test/defect"))
        n_good = COUNTS[(cell_type, 0.0)]
        assert len(train) == round(0.8 * n_good) and len(good) == n_good - len(train)
        assert len(defect) == COUNTS[(cell_type, 1.0)]  # p = 1 only; 1/3 and 2/3 are left out
        assert not train & good  # disjoint train and test
    assert not files(root / "mono" / "train/good") & files(root / "poly" / "train/good")


def test_test_cap_seed_and_idempotence(elpv_package: Path, tmp_path: Path) -> None:
    root = prepare_elpv(tmp_path / "elpv", max_test_per_class=3, seed=0)
    assert len(files(root / "poly" / "test/good")) == 3 and len(files(root / "poly" / "test/defect")) == 3
    # the cells beyond the cap form a validation split, disjoint from train and test
    splits = {
        sub: files(root / "poly" / sub) for sub in ("train/good", "test/good", "test/defect", "val/good", "val/defect")
    }
    assert len(splits["val/good"]) == 20 - 16 - 3 and len(splits["val/defect"]) == 4 - 3
    assert sum(map(len, splits.values())) == len(set().union(*splits.values()))
    first = files(root / "poly" / "train/good")
    (root / "poly" / "train/good" / "extra.png").write_bytes(b"")
    prepare_elpv(root, max_test_per_class=3, seed=0)  # same settings: left as it is
    assert (root / "poly" / "train/good" / "extra.png").exists()
    prepare_elpv(root, max_test_per_class=3, seed=1)  # other settings: laid out again
    assert not (root / "poly" / "train/good" / "extra.png").exists()
    assert files(root / "poly" / "train/good") != first


def test_missing_package_and_bad_share_are_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, elpv_package: Path
) -> None:
    with pytest.raises(ValueError, match="train_share must lie in"):
        prepare_elpv(tmp_path / "elpv", train_share=1.0)
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)  # import fails
    with pytest.raises(ImportError, match="pip install elpv-dataset"):
        prepare_elpv(tmp_path / "elpv")
