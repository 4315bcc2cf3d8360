"""Bad input stops before training with the file and the problem named; what anomalib can convert works.

Datasets here are anomalib ``Folder`` / ``MVTecAD`` layouts of a few 64x64 images written with PIL.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import Folder, MVTecAD
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from anomalib.pre_processing import PreProcessor
from PIL import Image
from torchvision.transforms.v2 import Resize

from anomalib_dsr import Dsr
from anomalib_dsr.data.data_check import DataError, check_datamodule, check_image_files, image_problem
from anomalib_dsr.data.image_folders import ImageFolders
from anomalib_dsr.model.original_format import WeightsError
from anomalib_dsr.model.torch_model import check_image_size

from conftest import CATEGORY, IMAGE_SIZE, TRAINER_KWARGS


def write_image(path: Path, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE), mode: str = "RGB", seed: int = 0) -> Path:
    """A random image of ``size`` (W, H) in PIL ``mode``."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path)
    return path


def write_mask(path: Path, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> Path:
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def folder_dataset(root: Path, n_good: int = 4, good_sizes=None, good_modes=None, mask_sizes=None) -> Path:
    """``root/{good,defect,mask}``: normal images, 2 defective images and their masks."""
    for i in range(n_good):
        size = good_sizes[i % len(good_sizes)] if good_sizes else (IMAGE_SIZE, IMAGE_SIZE)
        mode = good_modes[i % len(good_modes)] if good_modes else "RGB"
        write_image(root / "good" / f"{i:03d}.png", size, mode, seed=i)
    for i in range(2):
        write_image(root / "defect" / f"{i:03d}.png", seed=100 + i)
        write_mask(root / "mask" / f"{i:03d}.png", mask_sizes[i] if mask_sizes else (IMAGE_SIZE, IMAGE_SIZE))
    return root


def folder_datamodule(root: Path, **kwargs) -> Folder:
    datamodule = Folder(
        name="bad_input",
        root=root,
        normal_dir="good",
        abnormal_dir="defect",
        mask_dir="mask",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        **kwargs,
    )
    datamodule.setup()
    return datamodule


def damage_files(folder: Path) -> dict[str, str]:
    """Add broken files to ``folder``; returns file name → expected words of its problem."""
    good = (folder / "000.png").read_bytes()
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("this is a README, not an image\n")
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # a flipped bit inside the pixel data: PNG chunk checksum fails
    (folder / "bitflip.png").write_bytes(bytes(flipped))
    buffer = io.BytesIO()
    Image.open(folder / "000.png").convert("RGB").save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    (folder / "truncated_jpeg.png").write_bytes(jpeg[: len(jpeg) // 2])  # extension lies: PIL reads the content
    return {
        "zero.png": "zero-byte file",
        "text.png": "not an image",
        "truncated.png": "truncated or corrupt",
        "bitflip.png": "truncated or corrupt",
        "truncated_jpeg.png": "truncated or corrupt",
    }


def engine(root: Path, **kwargs) -> Engine:
    return Engine(default_root_dir=root, **TRAINER_KWARGS, **kwargs)


# --------------------------------------------------------------------------------------------- broken files
def test_every_broken_file_is_named_with_its_problem_in_one_error(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "data")
    expected = damage_files(root / "good")
    with pytest.raises(DataError) as error:
        check_datamodule(folder_datamodule(root))
    message = str(error.value)
    assert f"{len(expected)} of " in message
    for name, problem in expected.items():
        line = next(line for line in message.splitlines() if name in line)
        assert str(root / "good" / name) in line
        assert problem in line, line
    assert "000.png:" not in message  # good files are not listed


def test_image_problem_accepts_good_files(tmp_path: Path) -> None:
    for mode in ("RGB", "L", "RGBA", "P", "I;16"):
        assert image_problem(write_image(tmp_path / f"{mode}.png".replace(";", ""), mode=mode)) == ((64, 64), None)
    jpeg = tmp_path / "ok.jpg"
    Image.open(tmp_path / "RGB.png").save(jpeg)
    assert image_problem(jpeg) == ((64, 64), None)
    assert image_problem(tmp_path / "absent.png") == (None, "file not found")


def test_fit_stops_before_the_first_step_naming_the_broken_files(make_dsr, tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "data")
    expected = damage_files(root / "good")
    model = make_dsr()
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with pytest.raises(DataError, match="cannot be used") as error:
        engine(tmp_path / "results", max_steps=4).fit(model, datamodule=folder_datamodule(root))
    for name in expected:
        assert name in str(error.value)
    assert model.global_step == 0
    assert [k for k, v in model.model.state_dict().items() if not torch.equal(before[k], v)] == []


def test_vq_pretraining_names_broken_files_before_training(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    write_image(folder / "000.png")
    expected = damage_files(folder)
    with pytest.raises(DataError) as error:
        ImageFolders([folder], IMAGE_SIZE)
    for name in expected:
        assert str(folder / name) in str(error.value)
    assert check_image_files([folder / "000.png"]) == 1


def test_non_image_extensions_are_ignored_by_the_datamodule(tmp_path: Path) -> None:
    """anomalib's Folder picks files by extension: notes.txt is not a sample, so it cannot break training."""
    root = folder_dataset(tmp_path / "data")
    (root / "good" / "notes.txt").write_text("not an image")
    datamodule = folder_datamodule(root)
    assert not any(p.endswith("notes.txt") for p in datamodule.train_data.samples.image_path)
    assert check_datamodule(datamodule) > 0


# ------------------------------------------------------------------------- modes and sizes that are converted
def test_grayscale_rgba_palette_and_mixed_sizes_train(make_dsr, tmp_path: Path) -> None:
    """Grayscale, RGBA, palette and 16-bit images of sides that are not multiples of 8 or 32: read as RGB by
    anomalib's ``read_image``, batched at the batch's largest size, resized to 64x64 by the pre-processor."""
    modes = ["L", "RGBA", "P", "I;16", "RGB"]
    sizes = [(64, 64), (70, 50), (99, 131), (64, 64), (33, 47)]
    root = folder_dataset(tmp_path / "data", n_good=5, good_sizes=sizes, good_modes=modes)
    for path in sorted((root / "good").iterdir()):
        image = read_image(path, as_tensor=True)
        assert image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1, path
    datamodule = folder_datamodule(root)
    checked = check_datamodule(datamodule, make_dsr().pre_processor.transform, check_image_size)
    assert checked == 5 + 4  # 5 good, 2 defect, 2 masks

    model = make_dsr()
    engine(tmp_path / "results", max_steps=3).fit(model, datamodule=datamodule)
    assert model.global_step == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sizes_that_dsr_cannot_process_are_refused_with_a_message(make_dsr, tiny_widths, vq_weights, tmp_path: Path):
    root = folder_dataset(tmp_path / "data", good_sizes=[(64, 64), (100, 70)])
    datamodule = folder_datamodule(root)
    # No resizing pre-processor: the 100x70 image reaches the model as it is.
    with pytest.raises(ValueError, match=r"100x70.*becomes \(70, 100\).*multiples of 32") as error:
        check_datamodule(datamodule, None, check_image_size)
    assert "good/" in str(error.value)
    model = make_dsr(pre_processor=PreProcessor(transform=Resize((60, 60))))
    with pytest.raises(ValueError, match=r"becomes \(60, 60\).*multiples of 32"):
        engine(tmp_path / "results", max_steps=2).fit(model, datamodule=datamodule)
    # image_size itself is checked when the model is built.
    with pytest.raises(ValueError, match="multiples of 32"):
        Dsr(image_size=100, vq_weights=vq_weights, **tiny_widths)


# -------------------------------------------------------------------------------------------------- masks
def test_mask_of_another_size_is_refused_naming_both_files_and_sizes(make_dsr, tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "data", mask_sizes=[(64, 64), (32, 48)])
    datamodule = folder_datamodule(root)
    with pytest.raises(DataError) as error:
        check_datamodule(datamodule)
    message = str(error.value)
    assert str(root / "mask" / "001.png") in message and str(root / "defect" / "001.png") in message
    assert "32x48" in message and "64x64" in message and "resize the mask" in message
    assert "000.png: mask" not in message
    with pytest.raises(DataError, match="mask is 32x48"):
        engine(tmp_path / "results", max_steps=2).fit(make_dsr(), datamodule=datamodule)


def test_broken_mask_is_named(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "data")
    (root / "mask" / "000.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"mask/000\.png \(mask of .*defect/000\.png\): zero-byte file"):
        check_datamodule(folder_datamodule(root))


# ------------------------------------------------------------------------------------------- empty folders
def test_empty_train_folder_names_the_folder(make_dsr, demo_root: Path, tmp_path: Path) -> None:
    # MVTec layout with test images but an empty train/good: our check names the folder.
    root = tmp_path / "mvtec"
    shutil.copytree(demo_root / CATEGORY, root / CATEGORY)
    for path in (root / CATEGORY / "train" / "good").iterdir():
        path.unlink()
    datamodule = MVTecAD(root=root, category=CATEGORY, num_workers=0, train_batch_size=4, eval_batch_size=4)
    with pytest.raises(DataError, match=rf"training set is empty.*{root / CATEGORY / 'train'}"):
        engine(tmp_path / "results", max_steps=2).fit(make_dsr(), datamodule=datamodule)

    # Folder: anomalib itself refuses an empty normal_dir, naming it.
    folder = folder_dataset(tmp_path / "data")
    for path in (folder / "good").iterdir():
        path.unlink()
    with pytest.raises(RuntimeError, match=rf"Found 0 .*images in {folder / 'good'}"):
        folder_datamodule(folder)


# ------------------------------------------------------------------------------------------ non-finite loss
@pytest.mark.parametrize("phase", [2, 3])
def test_non_finite_loss_stops_naming_step_and_phase(make_dsr, make_datamodule, tmp_path: Path, phase: int) -> None:
    """max_steps=6 → 4 phase-2 steps. A NaN loss at the first step of ``phase`` stops the run there, with
    the step and phase in the message, before any weight turns NaN."""
    model = make_dsr()
    name = "restriction" if phase == 2 else "upsampling"
    original = getattr(model.loss, name)

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        if isinstance(out, dict):
            return {**out, "loss": out["loss"] * float("nan")}
        return out * float("inf")

    setattr(model.loss, name, poisoned)
    step = 0 if phase == 2 else 4
    with pytest.raises(FloatingPointError, match=rf"at step {step} \(phase {phase}\)"):
        engine(tmp_path, max_steps=6).fit(model, datamodule=make_datamodule())
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- weight files
def test_broken_vq_files_give_clear_errors(make_dsr, vq_weights: Path, tmp_path: Path) -> None:
    data = vq_weights.read_bytes()
    cases = {
        "truncated.pckl": (data[: len(data) // 2], "not a readable torch weights file"),
        "empty.pckl": (b"", "not a readable torch weights file"),
        "text.pckl": (b"hello, I am not weights\n", "not a readable torch weights file"),
    }
    for name, (content, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(WeightsError, match=words) as error:
            make_dsr(vq_weights=path).load_vq_weights()
        assert str(path) in str(error.value)
    foreign = tmp_path / "foreign.pckl"
    torch.save({"conv.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(WeightsError, match=r"does not match the layout.*unexpected keys \['conv.weight'\]"):
        make_dsr(vq_weights=foreign).load_vq_weights()


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory, vq_weights, demo_root, tiny_widths) -> Path:
    """A Lightning checkpoint of a 2-step tiny Dsr."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    tmp = tmp_path_factory.mktemp("ckpt")
    model = Dsr(
        vq_weights=vq_weights,
        pre_processor=Dsr.configure_pre_processor((IMAGE_SIZE, IMAGE_SIZE)),
        visualizer=False,
        **tiny_widths,
    )
    checkpoint = ModelCheckpoint(dirpath=tmp, filename="dsr", every_n_train_steps=2)
    datamodule = MVTecAD(root=demo_root, category=CATEGORY, num_workers=0, train_batch_size=4, eval_batch_size=4)
    Engine(default_root_dir=tmp / "results", callbacks=[checkpoint], max_steps=2, **TRAINER_KWARGS).fit(
        model, datamodule=datamodule
    )
    return tmp / "dsr.ckpt"


def test_lightning_checkpoint_given_as_vq_file_is_refused(make_dsr, trained_ckpt: Path) -> None:
    with pytest.raises(WeightsError, match="is a Lightning checkpoint, not a plain state_dict"):
        make_dsr(vq_weights=trained_ckpt).load_vq_weights()


def test_checkpoint_of_another_anomalib_model_is_refused(make_dsr, make_datamodule, trained_ckpt: Path, tmp_path):
    """Another model's checkpoint (here: a Dsr checkpoint re-labelled as anomalib's Patchcore) says so."""
    checkpoint = torch.load(trained_ckpt, map_location="cpu", weights_only=False)
    del checkpoint["dsr_phase2_steps"]
    checkpoint["hyper_parameters"] = {"backbone": "wide_resnet50_2", "layers": ["layer2", "layer3"]}
    checkpoint["state_dict"] = {"model.memory_bank": torch.zeros(4, 8)}
    foreign = tmp_path / "patchcore.ckpt"
    torch.save(checkpoint, foreign)
    with pytest.raises(WeightsError, match=r"not written by anomalib_dsr\.Dsr.*backbone"):
        engine(tmp_path, max_steps=2).test(make_dsr(), datamodule=make_datamodule(), ckpt_path=foreign)
    with pytest.raises(WeightsError, match=r"not written by anomalib_dsr\.Dsr"):
        engine(tmp_path, max_steps=4).fit(make_dsr(), datamodule=make_datamodule(), ckpt_path=foreign)


def test_truncated_lightning_checkpoint_fails_before_testing(make_dsr, make_datamodule, trained_ckpt, tmp_path):
    """Lightning reads ``ckpt_path`` itself; a truncated file fails in torch's reader before any batch."""
    data = trained_ckpt.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="zip archive|central directory|PytorchStreamReader"):
        engine(tmp_path, max_steps=2).test(make_dsr(), datamodule=make_datamodule(), ckpt_path=truncated)
