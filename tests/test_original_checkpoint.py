"""Import of the authors' released weights, faithfulness to their inference, and export back (SPEC §4–§7).

Released-layout files are built from random weights: at the paper's widths straight from the layout file
``tests/data/original_checkpoint_keys.txt`` (a copy of ``shared/dsr/original_checkpoint_keys.txt``, the
source of truth), at tiny widths with the shapes of a tiny model's original-layout keys (which
``test_layout_file_lists_our_modules_keys`` checks against that file).
The reference inference below is written from the spec with ``torch.nn.functional`` on the original
key names, and fed the picture as BGR; our model gets it as RGB.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from anomalib_dsr import Dsr, DsrModel
from anomalib_dsr.cli import main as dsr_cli
from anomalib_dsr.original_checkpoint import (
    PAPER_PHASE2_STEPS,
    export_original,
    import_original,
    load_original,
    original_paths,
)
from anomalib_dsr.original_format import ALL_FORMATS, VQ_FORMAT, WeightsError, original_state

LAYOUT_FILE = Path(__file__).parent / "data" / "original_checkpoint_keys.txt"
PAPER_WIDTHS = {
    "channels": 128,
    "res_hidden": 64,
    "num_embeddings": 4096,
    "embedding_dim": 128,
    "decoder_bottleneck": 64,
    "unet_width": 64,
}
CATEGORY = "bottle"
CODE_NORM = 0.5  # about the norm of the features the random encoders produce
Tensors = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------- building the files
def read_layout() -> dict[str, dict[str, tuple[int, ...]]]:
    """File name (``{category}`` for ``<class>``) → original key → shape, from the layout file."""
    layout: dict[str, dict[str, tuple[int, ...]]] = {}
    keys: dict[str, tuple[int, ...]] = {}
    for line in LAYOUT_FILE.read_text().splitlines():
        if line.startswith("## "):
            keys = {}
            for name in re.findall(r"(\S+\.pckl)", line.split("(")[0]):
                layout[name.replace("<class>", "{category}")] = keys
        elif line and not line.startswith("#"):
            key, shape, dtype = line.split()
            assert dtype == "float32"
            keys[key] = tuple(int(size) for size in shape.split("x"))
    return layout


def random_state(shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> Tensors:
    """Random tensors scaled like a default init (std 1/sqrt(fan-in)), so activations stay in range.

    Codebook entries get one common norm: the nearest entry is then the most similar in direction, and
    the codes chosen vary over the image instead of all being the entry of smallest norm.
    """
    state = {}
    for key, shape in shapes.items():
        fan_in = torch.Size(shape[1:]).numel() if len(shape) > 1 else 100
        state[key] = torch.randn(shape, generator=generator) / fan_in**0.5
        if key.endswith("_embedding.weight"):
            state[key] = F.normalize(state[key], dim=1) * CODE_NORM
    return state


def write_states(states: dict[str, Tensors], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, state in states.items():
        torch.save(state, folder / name.format(category=CATEGORY))


def read_states(folder: Path) -> dict[str, Tensors]:
    return {f.file_name: torch.load(f.path(folder, CATEGORY), weights_only=True) for f in ALL_FORMATS}


@pytest.fixture(scope="module")
def paper_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The six released files of ``bottle`` at the paper's widths, random weights (about 160 MB)."""
    generator = torch.Generator().manual_seed(0)
    folder = tmp_path_factory.mktemp("paper_original")
    write_states({name: random_state(shapes, generator) for name, shapes in read_layout().items()}, folder)
    return folder


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory, tiny_widths: dict[str, int]) -> Path:
    """The six released files of ``bottle`` at conftest's tiny widths, random weights."""
    model = DsrModel(**tiny_widths)
    generator = torch.Generator().manual_seed(0)
    states = {}
    for f in ALL_FORMATS:
        shapes = {key: tuple(value.shape) for key, value in original_state(getattr(model, f.attribute), f).items()}
        states[f.file_name] = random_state(shapes, generator)
    folder = tmp_path_factory.mktemp("tiny_original")
    write_states(states, folder)
    return folder


@pytest.fixture(scope="module")
def paper_ckpt(paper_files: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``paper_files`` imported with ``anomalib-dsr import-original``."""
    ckpt = tmp_path_factory.mktemp("paper_ckpt") / "model.ckpt"
    dsr_cli(["import-original", "--checkpoints", str(paper_files), "--category", CATEGORY, "--output", str(ckpt)])
    return ckpt


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_files: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_original(tiny_files, CATEGORY, tmp_path_factory.mktemp("tiny_ckpt") / "model.ckpt")


def assert_same_states(found: dict[str, Tensors], expected: dict[str, Tensors]) -> None:
    assert found.keys() == expected.keys()
    for name, state in expected.items():
        assert found[name].keys() == state.keys(), name
        for key, tensor in state.items():
            assert found[name][key].dtype == tensor.dtype, (name, key)
            assert torch.equal(found[name][key], tensor), (name, key)


# ------------------------------------------------------------------------- the reference inference (SPEC)
def conv(state: Tensors, name: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Conv ``name`` (bias if the file has one); 'same' padding for 1x1/3x3, halving for 4x4/2."""
    weight = state[f"{name}.weight"]
    return F.conv2d(x, weight, state.get(f"{name}.bias"), stride=stride, padding=weight.shape[-1] // 2 - (stride == 2))


def conv_t(state: Tensors, name: str, x: torch.Tensor) -> torch.Tensor:
    """Transposed conv 4x4/2, doubling the size."""
    return F.conv_transpose2d(x, state[f"{name}.weight"], state[f"{name}.bias"], stride=2, padding=1)


def residual_stack(state: Tensors, name: str, x: torch.Tensor) -> torch.Tensor:
    """2 x [ReLU, conv 3x3 (no bias), ReLU, conv 1x1 (no bias)] added to the rectified input, then ReLU.

    SPEC §2 says "added to the input"; the released code's first ReLU is in place, so the skip adds ReLU(x).
    """
    for i in range(2):
        block = f"{name}._layers.{i}._block"
        x = F.relu(x)
        x = x + conv(state, f"{block}.3", F.relu(conv(state, f"{block}.1", x)))
    return F.relu(x)


def conv_in_relu(state: Tensors, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.relu(F.instance_norm(conv(state, name, x)))


def double_conv(state: Tensors, name: str, x: torch.Tensor) -> torch.Tensor:
    """[conv 3x3, InstanceNorm, ReLU] x2: modules ``name.0`` and ``name.3``."""
    return conv_in_relu(state, f"{name}.3", conv_in_relu(state, f"{name}.0", x))


def up_conv(state: Tensors, name: str, x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 (align_corners), then conv ``name.1`` + InstanceNorm + ReLU."""
    return conv_in_relu(state, f"{name}.1", F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index ``(B, h, w)`` of the nearest codebook row by L2 for every position of ``z`` ``(B, D, h, w)``."""
    b, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
    return distances.argmin(1).view(b, h, w)


def lookup(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return codebook[codes].permute(0, 3, 1, 2)


def restriction(state: Tensors, q: torch.Tensor) -> torch.Tensor:
    """Subspace restriction (SPEC §2): encoder 3 levels with 2 max-pools, decoder without skips, linear end."""
    x = double_conv(state, "unet.encoder.block1", q)
    x = double_conv(state, "unet.encoder.block2", F.max_pool2d(x, 2))
    x = double_conv(state, "unet.encoder.block3", F.max_pool2d(x, 2))
    x = double_conv(state, "unet.decoder.db2", up_conv(state, "unet.decoder.up2", x))
    x = double_conv(state, "unet.decoder.db3", up_conv(state, "unet.decoder.up3", x))
    return conv(state, "unet.decoder.fin_out.0", x)


def unet(state: Tensors, x: torch.Tensor) -> torch.Tensor:
    """Anomaly detection / upsampling U-Net (SPEC §2): 4 levels, skips concatenated after each upsampling."""
    b1 = double_conv(state, "unet.encoder.block1", x)
    b2 = double_conv(state, "unet.encoder.block2", F.max_pool2d(b1, 2))
    b3 = double_conv(state, "unet.encoder.block3", F.max_pool2d(b2, 2))
    x = double_conv(state, "unet.encoder.block4", F.max_pool2d(b3, 2))
    for level, skip in ((1, b3), (2, b2), (3, b1)):
        x = torch.cat((up_conv(state, f"unet.decoder.up{level}", x), skip), 1)
        x = double_conv(state, f"unet.decoder.db{level}", x)
    return conv(state, "unet.decoder.fin_out.0", x)


def image_decoder_tail(state: Tensors, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """Conv 3x3, residual stack, transposed conv, ReLU, transposed conv; no output activation (D_gen, SPEC §2)."""
    x = residual_stack(state, f"{prefix}_residual_stack", conv(state, f"{prefix}_conv_1", x))
    return conv_t(state, f"{prefix}_conv_trans_2", F.relu(conv_t(state, f"{prefix}_conv_trans_1", x)))


def reference_codes(files: dict[str, Tensors], bgr: torch.Tensor) -> dict[str, torch.Tensor]:
    """SPEC §1 rows 1–5 and 7: both levels' codes before and after subspace restriction, for BGR input."""
    vq = files[VQ_FORMAT.file_name]
    codebook_lo, codebook_hi = vq["_vq_vae_top._embedding.weight"], vq["_vq_vae_bot._embedding.weight"]
    x = F.relu(conv(vq, "_encoder_b._conv_1", bgr, stride=2))
    x = F.relu(conv(vq, "_encoder_b._conv_2", x, stride=2))
    enc_hi = residual_stack(vq, "_encoder_b._residual_stack", conv(vq, "_encoder_b._conv_3", x))
    x = conv(vq, "_encoder_t._conv_2", F.relu(conv(vq, "_encoder_t._conv_1", enc_hi, stride=2)))
    z_lo = conv(vq, "_pre_vq_conv_top", residual_stack(vq, "_encoder_t._residual_stack", x))
    codes_lo = nearest_codes(z_lo, codebook_lo)
    q_lo = lookup(codes_lo, codebook_lo)
    # The spec does not give the order of this concatenation; the released code puts encoder_hi first.
    z_hi = conv(vq, "_pre_vq_conv_bot", torch.cat((enc_hi, conv_t(vq, "upsample_t", q_lo)), 1))
    codes_hi = nearest_codes(z_hi, codebook_hi)
    q_hi = lookup(codes_hi, codebook_hi)
    restricted_lo = restriction(files["DSR_subspace_restriction_lo_{category}.pckl"], q_lo)
    restricted_hi = restriction(files["DSR_subspace_restriction_hi_{category}.pckl"], q_hi)
    restricted_codes_lo = nearest_codes(restricted_lo, codebook_lo)
    restricted_codes_hi = nearest_codes(restricted_hi, codebook_hi)
    return {
        "codes_lo": codes_lo,
        "codes_hi": codes_hi,
        "restricted_codes_lo": restricted_codes_lo,
        "restricted_codes_hi": restricted_codes_hi,
        "z_lo": z_lo,
        "z_hi": z_hi,
        "restricted_lo": restricted_lo,
        "restricted_hi": restricted_hi,
        "codebook_lo": codebook_lo,
        "codebook_hi": codebook_hi,
        "q_lo": q_lo,
        "q_hi": q_hi,
        "restricted_q_lo": lookup(restricted_codes_lo, codebook_lo),
        "restricted_q_hi": lookup(restricted_codes_hi, codebook_hi),
    }


def reference_forward(files: dict[str, Tensors], bgr: torch.Tensor) -> dict[str, torch.Tensor]:
    """The authors' inference as SPEC §1 and §5 state it, for BGR input in [0, 1]."""
    vq = files[VQ_FORMAT.file_name]
    out = reference_codes(files, bgr)
    joined = torch.cat((conv_t(vq, "upsample_t", out["q_lo"]), out["q_hi"]), 1)
    image_gen = image_decoder_tail(vq, "_decoder_b.", joined)

    spc = files["DSR_image_recon_module_{category}.pckl"]
    x = torch.cat((conv_t(vq, "upsample_t", out["restricted_q_lo"]), out["restricted_q_hi"]), 1)
    x = F.max_pool2d(double_conv(spc, "block1", x), 2)
    x = F.max_pool2d(double_conv(spc, "block2", x), 2)
    x = F.relu(conv_t(spc, "upblock1", conv(spc, "pre_vq_conv", x)))
    image_spc = image_decoder_tail(spc, "", F.relu(conv_t(spc, "upblock2", x)))

    detection = files["DSR_anomaly_det_module_{category}.pckl"]
    upsampling = files["DSR_upsample_module_{category}.pckl"]
    probs_lo = unet(detection, torch.cat((image_spc, image_gen), 1)).softmax(1)
    probs = unet(upsampling, torch.cat((image_spc, image_gen, probs_lo), 1)).softmax(1)
    averaged = F.avg_pool2d(probs_lo[:, 1:], 21, stride=1, padding=10, count_include_pad=True)
    return {**out, "pred_score": averaged.amax(dim=(1, 2, 3)), "anomaly_map": probs[:, 1]}


def our_codes(model: DsrModel, rgb: torch.Tensor) -> dict[str, torch.Tensor]:
    vq = model.vq
    encoded = vq.encode(model.to_vq_input(rgb))
    return {
        "codes_lo": vq.codebook_lo.nearest(encoded.z_lo),
        "codes_hi": vq.codebook_hi.nearest(encoded.z_hi),
        "restricted_codes_lo": vq.codebook_lo.nearest(model.restriction_lo(encoded.q_lo)),
        "restricted_codes_hi": vq.codebook_hi.nearest(model.restriction_hi(encoded.q_hi)),
    }


# Which features and codebook each set of codes was chosen with.
CODE_SOURCES = {
    "codes_lo": ("z_lo", "codebook_lo"),
    "codes_hi": ("z_hi", "codebook_hi"),
    "restricted_codes_lo": ("restricted_lo", "codebook_lo"),
    "restricted_codes_hi": ("restricted_hi", "codebook_hi"),
}


def assert_same_codes(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """The same codes everywhere, except at exact ties.

    Deep networks with random weights put the odd feature (about 1 in 4000 at tiny widths) as near to
    two codes as float32 can resolve; there either choice is right. Such a position passes if, measured
    on the reference's features, our code is as near as the reference's to 1e-4 relative.
    """
    for name, codes in ours.items():
        assert codes.unique().numel() > 1, f"{name}: one code everywhere, the comparison would prove little"
        differ = codes != reference[name]
        if not differ.any():
            continue
        features, codebook = (reference[key] for key in CODE_SOURCES[name])
        flat = features.permute(0, 2, 3, 1)[differ]
        ours_distance = (flat - codebook[codes[differ]]).pow(2).sum(1)
        reference_distance = (flat - codebook[reference[name][differ]]).pow(2).sum(1)
        assert differ.float().mean() < 1e-3, f"{name}: {int(differ.sum())} of {codes.numel()} codes differ"
        torch.testing.assert_close(ours_distance, reference_distance, rtol=1e-4, atol=0, msg=name)


def sample_picture(size: int) -> torch.Tensor:
    """An RGB picture in [0, 1] with structure at every scale: smooth colour ramps plus noise."""
    generator = torch.Generator().manual_seed(1)
    ramp = torch.linspace(0, 1, size)
    x, y = ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size)
    rgb = torch.stack((x, y, x.flip(1)))
    return (0.7 * rgb + 0.3 * torch.rand(3, size, size, generator=generator)).unsqueeze(0)


# ---------------------------------------------------------------------------------------------------- tests
def test_layout_file_lists_our_modules_keys() -> None:
    """Every module's original-layout keys are exactly those of the released file (tiny widths)."""
    layout = read_layout()
    model = DsrModel(channels=8, res_hidden=4, num_embeddings=8, embedding_dim=8, decoder_bottleneck=4, unet_width=4)
    assert set(layout) == {f.file_name for f in ALL_FORMATS}
    for f in ALL_FORMATS:
        assert set(original_state(getattr(model, f.attribute), f)) == set(layout[f.file_name])


def test_import_paper_layout_every_tensor_lands(paper_files: Path, paper_ckpt: Path) -> None:
    checkpoint = torch.load(paper_ckpt, weights_only=True)
    assert checkpoint["dsr_phase2_steps"] == PAPER_PHASE2_STEPS
    assert "optimizer_states" not in checkpoint  # weights only: for test/predict/export, not for resuming
    model = Dsr.load_from_checkpoint(paper_ckpt)  # weights_only=True
    assert {k: model.hparams[k] for k in PAPER_WIDTHS} == PAPER_WIDTHS
    assert model.phase2_steps == PAPER_PHASE2_STEPS
    ours = {f.file_name: original_state(getattr(model.model, f.attribute), f) for f in ALL_FORMATS}
    assert_same_states(ours, read_states(paper_files))


def test_round_trip_is_bit_identical(paper_files: Path, paper_ckpt: Path, tmp_path: Path) -> None:
    """import → export-original → import, through the command line."""
    exported, second = tmp_path / "exported", tmp_path / "second.ckpt"
    dsr_cli(["export-original", "--ckpt", str(paper_ckpt), "--output", str(exported), "--category", CATEGORY])
    assert_same_states(read_states(exported), read_states(paper_files))
    vq = original_paths(exported, CATEGORY)[VQ_FORMAT]
    args = ["--checkpoints", str(exported), "--category", CATEGORY, "--vq", str(vq), "--output", str(second)]
    dsr_cli(["import-original", *args])
    states = [torch.load(path, weights_only=True)["state_dict"] for path in (paper_ckpt, second)]
    assert states[0].keys() == states[1].keys()
    for key, tensor in states[0].items():  # NaN: the post-processor's empty statistics
        torch.testing.assert_close(tensor, states[1][key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_export_refuses_to_mix_vq_models(tiny_ckpt: Path, tmp_path: Path) -> None:
    export_original(tiny_ckpt, tmp_path, CATEGORY)
    export_original(tiny_ckpt, tmp_path, "other")  # the same VQ-VAE: fine
    other = torch.load(tmp_path / VQ_FORMAT.file_name, weights_only=True)
    other["upsample_t.bias"] += 1
    torch.save(other, tmp_path / VQ_FORMAT.file_name)
    with pytest.raises(WeightsError, match="different general VQ-VAE"):
        export_original(tiny_ckpt, tmp_path, CATEGORY)


def assert_same_outputs(model: DsrModel, files: dict[str, Tensors], size: int) -> None:
    """Same pred_score and anomaly_map to 1e-4, computed in float64.

    Deep U-Nets with InstanceNorm and *random* weights amplify float32 rounding about a thousandfold (each
    side differs from its own float64 result by ~3e-4), so float32 could not tell an error from noise;
    in float64 the two agree to ~1e-12. The codes are compared in float32, the dtype of inference.
    """
    model = copy.deepcopy(model).double()
    rgb = sample_picture(size).double()
    files = {name: {key: value.double() for key, value in state.items()} for name, state in files.items()}
    reference = reference_forward(files, rgb.flip(1))
    ours = model(rgb)
    assert ours.pred_score.shape == (1,) and ours.anomaly_map.shape == (1, size, size)
    torch.testing.assert_close(ours.pred_score, reference["pred_score"], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.anomaly_map, reference["anomaly_map"], atol=1e-4, rtol=0)
    assert reference["anomaly_map"].std() > 1e-2, "a flat map would prove little"


@torch.no_grad()
def test_tiny_model_matches_reference_inference(tiny_files: Path) -> None:
    """RGB to our model, BGR to the reference: the same codes, pred_score and anomaly_map at 256x256."""
    model = load_original(tiny_files, CATEGORY).model.eval()
    files = read_states(tiny_files)
    rgb = sample_picture(256)
    assert_same_codes(our_codes(model, rgb), reference_codes(files, rgb.flip(1)))
    assert_same_outputs(model, files, 256)


@torch.no_grad()
def test_paper_model_matches_reference_inference(paper_files: Path) -> None:
    """Paper widths: the same codes at 256x256; the same outputs at 64x64 (256x256 would take a minute)."""
    model = load_original(paper_files, CATEGORY).model.eval()
    files = read_states(paper_files)
    rgb = sample_picture(256)
    assert_same_codes(our_codes(model, rgb), reference_codes(files, rgb.flip(1)))
    assert_same_outputs(model, files, 64)


# ------------------------------------------------------------------------ the imported checkpoint in anomalib
def width_args(widths: dict[str, int]) -> list[str]:
    return [arg for name, value in widths.items() for arg in (f"--model.{name}", str(value))]


def test_anomalib_test_predict_export_on_imported_checkpoint(
    tiny_ckpt: Path, demo_root: Path, tiny_widths: dict[str, int], tmp_path: Path
) -> None:
    """``anomalib test``, ``predict`` and ``export`` take the imported checkpoint like one from training."""
    from anomalib.cli import AnomalibCLI

    common = ["--model", "anomalib_dsr.Dsr", *width_args(tiny_widths), "--ckpt_path", str(tiny_ckpt)]
    common += ["--default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    data = ["--data", "anomalib.data.MVTecAD", "--data.root", str(demo_root), "--data.category", "gravel"]
    data += ["--data.num_workers", "0"]
    cli = AnomalibCLI(args=["test", *common, *data])
    metrics = cli.engine.trainer.callback_metrics
    assert {"image_AUROC", "pixel_AUROC", "pixel_AUPR"} <= set(metrics)
    assert all(0 <= float(metrics[name]) <= 1 for name in ("image_AUROC", "pixel_AUROC", "pixel_AUPR"))

    cli = AnomalibCLI(args=["predict", *common, "--data", str(demo_root / "gravel" / "test" / "scratch")])
    maps = [batch.anomaly_map for batch in cli.engine.trainer.predict_loop.predictions]
    assert len(maps) == 2 and all(m.shape[-2:] == (256, 256) for m in maps)  # two scratch images

    AnomalibCLI(args=["export", *common, "--export_type", "torch"])
    assert list(tmp_path.rglob("model.pt"))


def test_import_can_calibrate_on_a_datamodule(tiny_files: Path, make_datamodule, tmp_path: Path) -> None:
    """Without a datamodule the post-processor statistics stay NaN (raw probabilities, 0.5 decision)."""
    plain = torch.load(import_original(tiny_files, CATEGORY, tmp_path / "plain.ckpt"), weights_only=True)
    calibrated = import_original(tiny_files, CATEGORY, tmp_path / "calibrated.ckpt", datamodule=make_datamodule())
    calibrated = torch.load(calibrated, weights_only=True)
    for key in ("post_processor._image_threshold", "post_processor.image_min", "post_processor.pixel_max"):
        assert plain["state_dict"][key].isnan()
        assert not calibrated["state_dict"][key].isnan()


# ------------------------------------------------------------------------------------------------- errors
def copy_files(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def assert_clear(error: pytest.ExceptionInfo[WeightsError], *parts: str) -> None:
    """The message names what went wrong, and no torch traceback is chained to it."""
    for part in parts:
        assert part in str(error.value), (part, str(error.value))
    assert error.value.__cause__ is None and (error.value.__context__ is None or error.value.__suppress_context__)


def test_wrong_shape_names_file_key_and_shapes(tiny_files: Path, tmp_path: Path) -> None:
    folder = copy_files(tiny_files, tmp_path / "files")
    path = folder / f"DSR_upsample_module_{CATEGORY}.pckl"
    state = torch.load(path, weights_only=True)
    state["unet.decoder.db1.0.weight"] = state["unet.decoder.db1.0.weight"][:, :-1]
    torch.save(state, path)
    expected = tuple(torch.load(tiny_files / path.name, weights_only=True)["unet.decoder.db1.0.weight"].shape)
    found = (expected[0], expected[1] - 1, *expected[2:])
    with pytest.raises(WeightsError) as error:
        load_original(folder, CATEGORY)
    assert_clear(error, str(path), "unet.decoder.db1.0.weight", f"found {found}", f"expected {expected}")


def test_missing_and_unexpected_keys_are_named(tiny_files: Path, tmp_path: Path) -> None:
    folder = copy_files(tiny_files, tmp_path / "files")
    path = folder / f"DSR_image_recon_module_{CATEGORY}.pckl"
    state = torch.load(path, weights_only=True)
    state["conv_1.weight"] = state.pop("_conv_1.weight")  # a misspelt key must not pass as the right one
    torch.save(state, path)
    with pytest.raises(WeightsError) as error:
        load_original(folder, CATEGORY)
    assert_clear(error, str(path), "missing keys ['_conv_1.weight']", "unexpected keys ['conv_1.weight']")


@pytest.mark.parametrize("damage", ["truncated", "pickled object", "missing"])
def test_unreadable_file_gives_a_clear_error(tiny_files: Path, tmp_path: Path, damage: str) -> None:
    folder = copy_files(tiny_files, tmp_path / "files")
    path = folder / f"DSR_anomaly_det_module_{CATEGORY}.pckl"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "pickled object":
        torch.save({"model": torch.nn.Conv2d(1, 1, 1)}, path)
    else:
        path.unlink()
    with pytest.raises(WeightsError) as error:
        load_original(folder, CATEGORY)
    expected = {"truncated": "truncated or corrupt", "pickled object": "pickled Python objects", "missing": "not found"}
    assert_clear(error, str(path), expected[damage])


def test_command_line_reports_errors_without_traceback(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as error:
        dsr_cli(["import-original", "--checkpoints", str(tmp_path), "--category", CATEGORY, "--output", "m.ckpt"])
    assert str(error.value).startswith("anomalib-dsr import-original: error: Weights file not found")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as error:
        dsr_cli(["export-original", "--ckpt", str(tmp_path / "bad.ckpt"), "--output", str(tmp_path), "--category", "x"])
    assert "is not a loadable Lightning checkpoint" in str(error.value)


@pytest.mark.slow
@torch.no_grad()
def test_paper_model_outputs_at_paper_size(paper_files: Path) -> None:
    """The full check at the paper's configuration: widths and 256x256 input (about a minute on 2 cores)."""
    assert_same_outputs(load_original(paper_files, CATEGORY).model.eval(), read_states(paper_files), 256)
