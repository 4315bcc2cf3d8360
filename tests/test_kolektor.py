"""``anomalib-dsr prepare-kolektor``: KolektorSDD laid out as an MVTec AD category, on a tiny fake copy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from anomalib.data import MVTecAD
from PIL import Image
from torchvision.transforms.v2 import Resize

from anomalib_dsr.cli import main
from anomalib_dsr.data.kolektor import MARKER, KolektorError, prepare_kolektor

FOLDERS, PARTS = 3, 4
DEFECTIVE = {"kos01_Part1", "kos02_Part3"}  # kos02_Part3's label is a palette BMP, as in the real copy
GOOD = FOLDERS * PARTS - len(DEFECTIVE)


@pytest.fixture
def kolektor_src(tmp_path: Path) -> Path:
    """kos01..kos03 with Part0..Part3 (grey JPG, 32 px wide, heights varying by folder) and their BMP labels,
    plus entries to ignore: a text file and a nested copy of a folder."""
    src = tmp_path / "KolektorSDD"
    rng = np.random.default_rng(0)
    for f in range(1, FOLDERS + 1):
        folder = src / f"kos{f:02d}"
        folder.mkdir(parents=True)
        height = 60 + f
        for p in range(PARTS):
            Image.fromarray(rng.integers(0, 256, (height, 32), dtype=np.uint8)).save(folder / f"Part{p}.jpg")
            label = np.zeros((height, 32), dtype=np.uint8)
            if f"{folder.name}_Part{p}" in DEFECTIVE:
                label[10:20, 5:15] = 255
            if f"{folder.name}_Part{p}" == "kos02_Part3":
                # as kos20/Part4_label.bmp: palette indices 0 and 2 (grey 255); index 1 is grey 85
                palette = Image.frombytes("P", (32, height), ((label > 0) * 2).astype(np.uint8).tobytes())
                palette.putpalette([0, 0, 0, 85, 85, 85, 255, 255, 255] + [0] * 759)
                palette.save(folder / f"Part{p}_label.bmp")
            else:
                Image.fromarray(label).save(folder / f"Part{p}_label.bmp")
    (src / "kos01" / "readme.txt").write_text("not a part")
    (src / "kos03" / "kos01").mkdir()
    (src / "kos03" / "kos01" / "Part0.jpg").write_bytes((src / "kos01" / "Part0.jpg").read_bytes())
    return src


def stems(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.png")}


def test_layout_counts_names_and_masks(kolektor_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    main(["prepare-kolektor", str(kolektor_src), str(out)])
    printed = capsys.readouterr().out
    root = out / "kolektor"
    train, good, defect = (stems(root / sub) for sub in ("train/good", "test/good", "test/defect"))
    n_test_good = round(0.2 * GOOD)
    assert (len(train), len(good)) == (GOOD - n_test_good, n_test_good) and not train & good
    assert defect == DEFECTIVE
    assert f"{GOOD - n_test_good} train/good, {n_test_good} test/good, {len(DEFECTIVE)} test/defect" in printed
    assert "ignored (2): kos01/readme.txt, kos03/kos01" in printed  # the text file and the nested folder
    assert stems(root / "ground_truth/defect") == {f"{name}_mask" for name in DEFECTIVE}
    for name in DEFECTIVE:
        image = Image.open(root / "test/defect" / f"{name}.png")
        mask = np.asarray(Image.open(root / "ground_truth/defect" / f"{name}_mask.png"))
        assert mask.shape == (image.height, image.width) and set(np.unique(mask)) == {0, 255}
        assert mask.sum() == 100 * 255  # the 10x10 defect, the palette label read by colour too
    source = Image.open(kolektor_src / "kos03" / "Part0.jpg")
    written = next(root.glob("*/good/kos03_Part0.png"))
    assert np.array_equal(np.asarray(Image.open(written)), np.asarray(source))  # lossless, original size


def test_split_is_seeded_and_reruns_are_idempotent(kolektor_src: Path, tmp_path: Path) -> None:
    first = prepare_kolektor(kolektor_src, tmp_path / "a", seed=0)
    prepare_kolektor(kolektor_src, tmp_path / "b", seed=0)
    assert stems(tmp_path / "a/kolektor/test/good") == stems(tmp_path / "b/kolektor/test/good")
    others = [stems(prepare_kolektor(kolektor_src, tmp_path / f"s{s}", seed=s).root / "test/good") for s in (1, 2, 3)]
    assert any(other != stems(first.root / "test/good") for other in others)

    (first.root / "train/good/extra.png").write_bytes(b"")
    again = prepare_kolektor(kolektor_src, tmp_path / "a", seed=0)  # the same settings: left as it is
    assert not again.written and (again.train_good, again.test_good) == (first.train_good, first.test_good)
    assert (first.root / "train/good/extra.png").exists()
    with pytest.raises(KolektorError, match=r"kolektor is not empty .* --force"):
        prepare_kolektor(kolektor_src, tmp_path / "a", seed=0, test_good_share=0.5)
    replaced = prepare_kolektor(kolektor_src, tmp_path / "a", seed=0, test_good_share=0.5, force=True)
    assert replaced.written and replaced.test_good == GOOD // 2
    assert not (first.root / "train/good/extra.png").exists()
    assert json.loads((first.root / MARKER).read_text())["counts"]["test_good"] == GOOD // 2


def test_mvtec_datamodule_reads_the_layout(kolektor_src: Path, tmp_path: Path) -> None:
    prepare_kolektor(kolektor_src, tmp_path)
    datamodule = MVTecAD(
        root=tmp_path, category="kolektor", train_batch_size=4, eval_batch_size=12, num_workers=0,
        augmentations=Resize((64, 64)),
    )  # fmt: skip
    datamodule.setup()
    assert len(datamodule.train_data) == GOOD - round(0.2 * GOOD)
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape[1:] == (3, 64, 64)
    assert int(batch.gt_label.sum()) == len(DEFECTIVE) and int(batch.gt_mask.flatten(1).any(1).sum()) == len(DEFECTIVE)


def test_bad_sources_are_named(kolektor_src: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(KolektorError, match=f"{re.escape(str(missing))} does not exist.*kos01"):
        prepare_kolektor(missing, tmp_path / "out")
    with pytest.raises(SystemExit, match=r"prepare-kolektor: error: .* holds no kosNN folders"):
        main(["prepare-kolektor", str(tmp_path), str(tmp_path / "out")])
    with pytest.raises(KolektorError, match=r"test_good_share must lie in \(0, 1\), got 1.0"):
        prepare_kolektor(kolektor_src, tmp_path / "out", test_good_share=1.0)

    (kolektor_src / "kos02" / "Part1_label.bmp").unlink()
    (kolektor_src / "kos03" / "Part2.jpg").unlink()
    with pytest.raises(KolektorError) as error:
        prepare_kolektor(kolektor_src, tmp_path / "out")
    message = str(error.value)
    assert f"{kolektor_src / 'kos02' / 'Part1.jpg'} has no label Part1_label.bmp" in message
    assert f"{kolektor_src / 'kos03' / 'Part2_label.bmp'} has no image Part2.jpg" in message
    assert not (tmp_path / "out").exists()


def test_label_of_another_size_is_named(kolektor_src: Path, tmp_path: Path) -> None:
    label = kolektor_src / "kos01" / "Part2_label.bmp"
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(label)
    with pytest.raises(KolektorError, match=f"Label {re.escape(str(label))} is 10x10 but image .*Part2.jpg is 32x61"):
        prepare_kolektor(kolektor_src, tmp_path / "out")


def test_validation_split_holds_out_whole_commutators(kolektor_src: Path, tmp_path: Path, capsys) -> None:
    """``--val-share``: whole commutators go to ``kolektor_val/test``, none of their images to ``kolektor/test``; the
    held-out defect-free images are those of the layout without validation, and both splits train on the same
    images. Seed 2 holds out kos01 (a defect); seed 0 would hold out kos03, which has none: refused."""
    out = tmp_path / "out"
    main(["prepare-kolektor", str(kolektor_src), str(out), "--val-share", "0.34", "--seed", "2"])
    printed = capsys.readouterr().out
    root, val = out / "kolektor", out / "kolektor_val"
    tested = stems(root / "test/good") | stems(root / "test/defect")
    validated = stems(val / "test/good") | stems(val / "test/defect")
    assert {name.split("_")[0] for name in validated} == {"kos01"}
    assert "kos01" not in {name.split("_")[0] for name in tested}
    assert stems(val / "test/defect") == {"kos01_Part1"} and stems(root / "test/defect") == {"kos02_Part3"}
    assert stems(val / "ground_truth/defect") == {"kos01_Part1_mask"}
    assert stems(val / "train/good") == stems(root / "train/good")
    plain = prepare_kolektor(kolektor_src, tmp_path / "plain", seed=2)
    assert stems(root / "test/good") | stems(val / "test/good") == stems(plain.root / "test/good")
    assert "Validation split" in printed and 'category="kolektor_val"' in printed

    again = prepare_kolektor(kolektor_src, out, seed=2, val_share=0.34)  # the same settings: left as it is
    assert not again.written and again.val_parts == ("kos01",) and again.val_defect == 1
    datamodule = MVTecAD(root=out, category="kolektor_val", eval_batch_size=12, num_workers=0)
    datamodule.setup()
    assert len(datamodule.train_data) == len(stems(root / "train/good")) and len(datamodule.test_data) == len(validated)

    with pytest.raises(KolektorError, match=r"holds out 1 of 3 commutators \(kos03\).*without a defective image"):
        prepare_kolektor(kolektor_src, tmp_path / "bad", seed=0, val_share=0.34)
    with pytest.raises(KolektorError, match=r"val_share must lie in \[0, 1\), got 1.0"):
        prepare_kolektor(kolektor_src, tmp_path / "bad", val_share=1.0)
