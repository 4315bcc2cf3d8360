"""``anomalib-dsr inspect``: per-image stage panels and per-stage figures from a trained checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from anomalib_dsr import Dsr
from anomalib_dsr.cli import main
from anomalib_dsr.workflows import inspect as inspect_module
from anomalib_dsr.workflows.inspect import DPI, MAPS, PANEL_INCHES, TITLE_INCHES, InspectError, inspect

from conftest import CATEGORY, IMAGE_SIZE, TRAINER_KWARGS

PANEL_SIZE = (round(6 * PANEL_INCHES * DPI), round((PANEL_INCHES + TITLE_INCHES) * DPI))  # PIL: (W, H)
STAGES = ("I_gen", "I_spc", *MAPS)


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory, vq_weights, demo_root, tiny_widths) -> Path:
    """A tiny Dsr after 2 training steps (one per phase), as ``anomalib train`` saves it."""
    tmp = tmp_path_factory.mktemp("inspect_ckpt")
    pre_processor = Dsr.configure_pre_processor((IMAGE_SIZE, IMAGE_SIZE))
    model = Dsr(vq_weights=vq_weights, pre_processor=pre_processor, visualizer=False, **tiny_widths)
    checkpoint = ModelCheckpoint(dirpath=tmp, filename="dsr", every_n_train_steps=2)
    datamodule = MVTecAD(root=demo_root, category=CATEGORY, num_workers=0, train_batch_size=4, eval_batch_size=4)
    engine = Engine(default_root_dir=tmp / "results", callbacks=[checkpoint], max_steps=2, **TRAINER_KWARGS)
    engine.fit(model, datamodule=datamodule)
    return tmp / "dsr.ckpt"


def test_category_folder_panels_table_and_json(trained_ckpt, demo_root, tmp_path, capsys, monkeypatch) -> None:
    """The demo category: 4 good test images and 2 of each of two defect types, masks in ground_truth/."""
    axes_per_figure = []
    render = inspect_module.render_panels

    def counting_render(*args, **kwargs):
        figure = render(*args, **kwargs)
        axes_per_figure.append(len(figure.axes))
        return figure

    monkeypatch.setattr(inspect_module, "render_panels", counting_render)
    out = tmp_path / "out"
    main(["inspect", str(trained_ckpt), str(demo_root / CATEGORY), "--output", str(out), "--batch-size", "3"])
    printed = capsys.readouterr().out

    panels = sorted((out / "panels").glob("*.png"))
    expected = [f"{kind}_{i:03d}" for kind, n in (("good", 4), ("contamination", 2), ("scratch", 2)) for i in range(n)]
    assert [p.stem for p in panels] == sorted(expected)
    assert axes_per_figure == [6] * 8
    assert all(Image.open(p).size == PANEL_SIZE for p in panels)

    for stage in STAGES:
        assert re.search(rf"^{re.escape(stage)}\s+\d\.\d{{4}}", printed, re.MULTILINE), stage
    assert "inside" in printed and "outside" in printed and "ratio" in printed
    report = json.loads((out / "inspect.json").read_text())
    assert (report["images"], report["defective_images"], report["image_size"]) == (8, 4, [IMAGE_SIZE, IMAGE_SIZE])
    assert set(report["pixel_auroc"]) == set(MAPS)
    for value in (*report["pixel_auroc"].values(), report["image_auroc"]):
        assert 0.0 <= value <= 1.0
    for row in report["reconstruction_error"].values():
        assert row["inside"] > 0 and row["outside"] > 0
        assert row["ratio"] == pytest.approx(row["inside"] / row["outside"])
    good = [r for r in report["per_image"] if r["mask"] is None]
    assert len(good) == 4 and all(r["defect_pixels"] == 0 and r["mean_inside"]["P_lo"] is None for r in good)


def test_limit_spreads_over_the_sorted_images(trained_ckpt, demo_root, tmp_path) -> None:
    report = inspect(trained_ckpt, demo_root / CATEGORY, tmp_path, limit=3)
    assert [Path(r["image"]).parent.name for r in report["per_image"]] == ["contamination", "good", "scratch"]
    assert len(list((tmp_path / "panels").glob("*.png"))) == 3


def known_case(root: Path) -> Path:
    """A category folder of dark images (grey 25) with a bright square (grey 230) exactly where the mask is."""
    for kind, count in (("good", 2), ("defect", 2)):
        (root / "test" / kind).mkdir(parents=True)
        for i in range(count):
            image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 25, dtype=np.uint8)
            if kind == "defect":
                mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
                mask[8 + 16 * i : 24 + 16 * i, 16:40] = 255
                image[mask > 0] = 230
                (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "ground_truth" / kind / f"{i:03d}_mask.png")
            Image.fromarray(image).save(root / "test" / kind / f"{i:03d}.png")
    return root


def test_known_case_decoders_that_output_zero(trained_ckpt, tmp_path) -> None:
    """Both decoders' last layers zeroed: I_gen = I_spc = 0, so the error of each is the input itself (230/255
    inside the mask, 25/255 outside), |I_gen − I_spc| is zero and P_lo constant (AUROC 0.5)."""
    checkpoint = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    for key in ("model.vq.decoder.conv_trans_2", "model.object_decoder.decoder.conv_trans_2"):
        for suffix in (".weight", ".bias"):
            checkpoint["state_dict"][key + suffix].zero_()
    zeroed = tmp_path / "zeroed.ckpt"
    torch.save(checkpoint, zeroed)

    report = inspect(zeroed, known_case(tmp_path / "known"), tmp_path / "out")
    for stage in ("I_gen", "I_spc"):
        row = report["reconstruction_error"][stage]
        assert row["inside"] == pytest.approx(230 / 255, abs=1e-5)
        assert row["outside"] == pytest.approx(25 / 255, abs=1e-5)
        assert row["ratio"] == pytest.approx(230 / 25, rel=1e-4)
    # The final map is not constant: the upsampling U-Net's zero padding meets the constant, non-zero P_lo.
    # Exact by construction: on zero images every convolution outputs its bias, whatever its algorithm, and the
    # centring InstanceNorm turns a constant channel into exact zeros (same with AVX-512, AVX2 and plain ATen
    # kernels), so P_lo is constant bit for bit and its AUROC 0.5 exactly.
    assert [report["pixel_auroc"][label] for label in MAPS[:2]] == pytest.approx([0.5, 0.5])
    assert report["defect_pixels"] == 2 * 16 * 24


def test_bad_input_is_named(trained_ckpt, demo_root, tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(InspectError, match=f"{re.escape(str(tmp_path / 'nowhere'))} does not exist"):
        inspect(trained_ckpt, tmp_path / "nowhere", out)
    with pytest.raises(SystemExit, match="inspect: error: .* is not an MVTec AD category folder .*--masks"):
        main(["inspect", str(trained_ckpt), str(demo_root / CATEGORY / "test"), "--output", str(out)])

    # An image outside a 'good' folder whose mask is missing.
    images, masks = tmp_path / "images", tmp_path / "masks"
    (images / "dent").mkdir(parents=True)
    masks.mkdir()
    Image.fromarray(np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)).save(images / "dent" / "a.png")
    expected = re.escape(f"{images / 'dent' / 'a.png'} (looked for {masks / 'dent' / 'a_mask.png'}")
    with pytest.raises(InspectError, match=expected + ".*folder named 'good'"):
        inspect(trained_ckpt, images, out, masks=masks)

    with pytest.raises(InspectError, match=f"Checkpoint {re.escape(str(tmp_path / 'x.ckpt'))} does not exist"):
        inspect(tmp_path / "x.ckpt", demo_root / CATEGORY, out)
    checkpoint = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    del checkpoint["dsr_phase2_steps"]  # as in another anomalib model's checkpoint
    foreign = tmp_path / "patchcore.ckpt"
    torch.save(checkpoint, foreign)
    with pytest.raises(InspectError, match=f"{re.escape(str(foreign))} is not a loadable .* of anomalib_dsr.Dsr"):
        inspect(foreign, demo_root / CATEGORY, out)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(InspectError, match=f"{re.escape(str(text))} is not a loadable .*anomalib train"):
        inspect(text, demo_root / CATEGORY, out)
