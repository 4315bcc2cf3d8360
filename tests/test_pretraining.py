"""Phase 1 (docs/method.md#phase-1): pretraining the general VQ-VAE and writing it in the authors' layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anomalib_dsr import Dsr
from anomalib_dsr.cli import main as dsr_cli
from anomalib_dsr.data.image_folders import ImageFolders
from anomalib_dsr.model.original_format import (
    VQ_FORMAT,
    WeightsError,
    load_original_state,
    original_state,
    read_state_dict,
)
from anomalib_dsr.model.vq_vae import GeneralVQVAE
from anomalib_dsr.workflows.pretrain_vq import pretrain_vq

from conftest import CATEGORY, IMAGE_SIZE, TRAINER_KWARGS, VQ_WIDTHS

ORIGINAL_PREFIXES = (
    "_encoder_b.",
    "_encoder_t.",
    "_pre_vq_conv_top.",
    "_pre_vq_conv_bot.",
    "_vq_vae_top.",
    "_vq_vae_bot.",
    "_decoder_b.",
    "upsample_t.",
)


RELEASED_KEYS = Path(__file__).parent / "data" / "original_checkpoint_keys.txt"  # the authors' key layout, as released


def released_vq_keys() -> set[str]:
    """Tensor names of the authors' ``vq_model_pretrained_128_4096.pckl``, from the listing."""
    keys: set[str] = set()
    section = None
    for line in RELEASED_KEYS.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].split()[0]
        elif section == "vq_model_pretrained_128_4096.pckl" and line.strip() and not line.startswith("#"):
            keys.add(line.split()[0])
    return keys


def train_folder(demo_root: Path) -> Path:
    return demo_root / CATEGORY / "train" / "good"


def reconstruction_error(path: Path, images: torch.Tensor) -> float:
    """MSE of the VQ-VAE stored at ``path`` on RGB ``images``, fed as BGR like in training."""
    model = GeneralVQVAE(**VQ_WIDTHS)
    load_original_state(model, read_state_dict(path), VQ_FORMAT, path)
    model.eval()
    with torch.no_grad():
        reconstruction, _, _ = model(images.flip(1))
    return F.mse_loss(reconstruction, images.flip(1)).item()


def test_short_pretraining_lowers_reconstruction_error(demo_root: Path, tmp_path: Path) -> None:
    """Same seed, same data: after 40 steps the reconstruction error is well below that after 1 step."""
    dataset = ImageFolders([train_folder(demo_root)], IMAGE_SIZE)
    images = torch.stack([dataset[i] for i in range(len(dataset))])
    kwargs = {"image_size": IMAGE_SIZE, "batch_size": 4, "resume": False, "learning_rate": 1e-3, **VQ_WIDTHS}
    folders = [train_folder(demo_root)]
    early = pretrain_vq(folders, tmp_path / "early.pckl", max_steps=1, trainer_kwargs=dict(TRAINER_KWARGS), **kwargs)
    late = pretrain_vq(folders, tmp_path / "late.pckl", max_steps=40, trainer_kwargs=dict(TRAINER_KWARGS), **kwargs)
    early_error, late_error = reconstruction_error(early, images), reconstruction_error(late, images)
    assert late_error < 0.5 * early_error, (early_error, late_error)
    # The EMA codebooks moved during pretraining.
    codebook = "_vq_vae_top._embedding.weight"
    assert not torch.equal(read_state_dict(early)[codebook], read_state_dict(late)[codebook])
    # Lightning checkpoints go beside the output unless told otherwise.
    assert (tmp_path / "late_checkpoints" / "last.ckpt").is_file()


def test_written_file_is_a_plain_state_dict_in_the_original_layout(vq_weights: Path) -> None:
    state = torch.load(vq_weights, map_location="cpu", weights_only=True)
    assert type(state) is dict
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert all(key.startswith(ORIGINAL_PREFIXES) for key in state), sorted(state)
    assert set(state) == released_vq_keys()  # exactly the tensors of vq_model_pretrained_128_4096.pckl
    assert len(state) == 40
    c, h, k, d = (VQ_WIDTHS[n] for n in ("channels", "res_hidden", "num_embeddings", "embedding_dim"))
    expected_shapes = {
        "_vq_vae_top._embedding.weight": (k, d),
        "_vq_vae_bot._embedding.weight": (k, d),
        "_vq_vae_top._ema_w": (k, d),
        "_vq_vae_top._ema_cluster_size": (k,),
        "_encoder_b._conv_1.weight": (c // 2, 3, 4, 4),
        "_encoder_b._residual_stack._layers.1._block.3.weight": (c, h, 1, 1),
        "_encoder_t._conv_1.weight": (c, c, 4, 4),
        "_pre_vq_conv_top.weight": (d, c, 1, 1),
        "_pre_vq_conv_bot.weight": (d, d + c, 1, 1),
        "upsample_t.weight": (d, d, 4, 4),
        "_decoder_b._conv_1.weight": (c, 2 * d, 3, 3),
        "_decoder_b._conv_trans_2.weight": (c // 2, 3, 4, 4),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_dsr_loads_the_pretrained_file(vq_weights: Path, tiny_widths: dict[str, int]) -> None:
    model = Dsr(vq_weights=vq_weights, **tiny_widths)
    state = read_state_dict(vq_weights)
    vq = model.model.vq
    assert not torch.equal(vq.codebook_lo.embedding.weight, state["_vq_vae_top._embedding.weight"])  # before loading
    model.load_vq_weights()
    assert torch.equal(vq.codebook_lo.embedding.weight, state["_vq_vae_top._embedding.weight"])  # top = K_lo
    assert torch.equal(vq.codebook_hi.embedding.weight, state["_vq_vae_bot._embedding.weight"])  # bot = K_hi
    assert torch.equal(vq.encoder_hi.conv_1.weight, state["_encoder_b._conv_1.weight"])
    assert torch.equal(vq.encoder_lo.conv_1.weight, state["_encoder_t._conv_1.weight"])
    assert torch.equal(vq.upsample_lo.weight, state["upsample_t.weight"])
    assert torch.equal(vq.codebook_lo.ema_cluster_size, state["_vq_vae_top._ema_cluster_size"])
    ours = original_state(vq, VQ_FORMAT)
    assert set(ours) == set(state)
    assert all(torch.equal(ours[key], state[key]) for key in state)


def test_width_mismatch_names_tensor_and_shapes(vq_weights: Path, tiny_widths: dict[str, int]) -> None:
    model = Dsr(vq_weights=vq_weights, **{**tiny_widths, "num_embeddings": 64})
    with pytest.raises(WeightsError, match=r"_vq_vae_top\.(_embedding\.weight|_ema_w|_ema_cluster_size).*\(32"):
        model.load_vq_weights()


def test_image_folders(tmp_path: Path, demo_root: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=str(empty)):
        ImageFolders([empty], 32)
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ImageFolders([missing], 32)

    nested = tmp_path / "nested" / "deeper"
    nested.mkdir(parents=True)
    Image.new("RGB", (40, 24), (255, 0, 0)).save(nested / "red.JPG")
    Image.new("L", (10, 10), 128).save(tmp_path / "nested" / "grey.png")
    dataset = ImageFolders([tmp_path / "nested", train_folder(demo_root)], 32)
    assert len(dataset) == 2 + 8
    for i in range(len(dataset)):
        image = dataset[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
    red = next(dataset[i] for i, p in enumerate(dataset.paths) if p.name == "red.JPG")
    assert red[0].mean() > 0.9 and red[1:].mean() < 0.1  # RGB order


def test_pretrain_command_line(demo_root: Path, tmp_path: Path, tiny_widths: dict[str, int]) -> None:
    """The command named in the missing-weights hint works and its output loads into Dsr."""
    output = tmp_path / "cli" / "vq.pckl"
    dsr_cli(
        [
            "pretrain-vq",
            "--images",
            str(train_folder(demo_root)),
            "--output",
            str(output),
            "--image-size",
            str(IMAGE_SIZE),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--num-workers",
            "0",
            "--accelerator",
            "cpu",
            *[arg for name, value in VQ_WIDTHS.items() for arg in (f"--{name.replace('_', '-')}", str(value))],
        ]
    )
    assert output.is_file()
    Dsr(vq_weights=output, **tiny_widths).load_vq_weights()


def test_general_pretraining_from_the_command_line_logs_codebook_usage(
    tmp_path: Path, tiny_widths: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    """`pretrain-vq --general` trains on the photographs packages ship and logs how many codes are used."""
    output = tmp_path / "general" / "vq.pckl"
    widths = [arg for name, value in VQ_WIDTHS.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    with caplog.at_level("INFO", logger="anomalib_dsr.workflows.pretrain_vq"):
        dsr_cli(["pretrain-vq", "--general", "--output", str(output), "--image-size", "64", "--max-steps", "3",
                 "--batch-size", "4", "--num-workers", "0", "--accelerator", "cpu", *widths])  # fmt: skip
    usage = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Codebook usage"))
    k = VQ_WIDTHS["num_embeddings"]
    lo, hi = (int(n) for n in re.findall(rf"(\d+)/{k} codes", usage))
    assert 1 <= lo <= k and 1 <= hi <= k
    Dsr(vq_weights=output, **tiny_widths).load_vq_weights()


def test_image_source_must_be_folders_or_general(demo_root: Path, tmp_path: Path) -> None:
    for images, general in (([train_folder(demo_root)], True), (None, False)):
        with pytest.raises(ValueError, match="either image folders"):
            pretrain_vq(images, tmp_path / "vq.pckl", general=general, max_steps=1)
    with pytest.raises(SystemExit, match="either --images"):
        dsr_cli(["pretrain-vq", "--output", str(tmp_path / "vq.pckl")])
