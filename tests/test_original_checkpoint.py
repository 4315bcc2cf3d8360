"""Import of the authors' released weights, faithfulness to their inference, and export back (docs/method.md).

Released-layout files are built from random weights initialised as the authors' modules are: at the paper's
widths straight from the layout file ``tests/data/original_checkpoint_keys.txt`` (a copy of
``shared/dsr/original_checkpoint_keys.txt``, the source of truth), at tiny widths with the shapes of a tiny model's
original-layout keys (which ``test_layout_file_lists_our_modules_keys`` checks against that file).
The reference is the authors' inference, written from their code in ``authors_reference.py``; it loads the same
files and is fed the pictures as BGR, our imported model gets them as RGB.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalib_dsr import Dsr, DsrModel
from anomalib_dsr.checkpoints.original_checkpoint import (
    PAPER_PHASE2_STEPS,
    export_original,
    import_original,
    load_original,
    original_paths,
)
from anomalib_dsr.cli import main as dsr_cli
from anomalib_dsr.model.original_format import ALL_FORMATS, VQ_FORMAT, WeightsError, original_state
from anomalib_dsr.model.vq_vae import EMACodebook

from authors_reference import AuthorsDsr
from deploy_support import (
    ONNX_KWARGS,
    RunWithCodes,
    assert_faithful,
    onnxruntime_with_codes,
    openvino_with_codes,
    score_map_figures,
)

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
SIZE = 256  # the paper's input size
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
    """Random tensors as the authors' modules start out: PyTorch's default init of (transposed) convolutions,
    weights and biases U(±1/sqrt(fan-in)) with fan-in = the weight's size over its dims 1+ (as torch computes
    it); codebooks and ``_ema_w`` N(0, 1) as their quantiser draws them; EMA cluster sizes 1.

    Features are small next to such codes, so few codes are used: one or two of 4096 per level on the test pictures.
    """
    state = {}
    for key, shape in shapes.items():
        if key.endswith(("_embedding.weight", "_ema_w")):
            state[key] = torch.randn(shape, generator=generator)
        elif key.endswith("_ema_cluster_size"):
            state[key] = torch.ones(shape)
        else:
            weight = shapes[key.removesuffix(".bias") + ".weight"] if key.endswith(".bias") else shape
            bound = torch.Size(weight[1:]).numel() ** -0.5
            state[key] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
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


# ------------------------------------------------------------------------------------------------ pictures
def photograph(name: str) -> torch.Tensor:
    """A photograph scikit-image ships (no download) as RGB ``(1, 3, 256, 256)`` in [0, 1], NCHW-contiguous."""
    from skimage import data

    image = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).unsqueeze(0).float() / 255
    return F.interpolate(image, size=(SIZE, SIZE), mode="bilinear", antialias=True).clamp(0, 1).contiguous()


def paint(background: tuple[float, ...], *areas: tuple[torch.Tensor, tuple[float, ...]]) -> torch.Tensor:
    """``(1, 3, 256, 256)``: a flat ``background`` colour with flat ``areas`` (boolean masks) painted over it."""
    image = torch.tensor(background).view(3, 1, 1).repeat(1, SIZE, SIZE)
    for mask, colour in areas:
        image[:, mask] = torch.tensor(colour).view(3, 1)
    return image.unsqueeze(0)


def flat_pictures() -> dict[str, torch.Tensor]:
    """A grey picture with a small red patch, and one of a few flat regions (sky, ground, sun, wall)."""
    y, x = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    patch = (y >= 150) & (y < 182) & (x >= 90) & (x < 122)
    sun = (x - 190) ** 2 + (y - 60) ** 2 < 28**2
    wall = (y >= 110) & (y < 200) & (x >= 40) & (x < 120)
    return {
        "flat_patch": paint((0.45, 0.5, 0.55), (patch, (0.8, 0.2, 0.1))),
        "flat_regions": paint(
            (0.25, 0.45, 0.8), (y >= 170, (0.3, 0.5, 0.15)), (sun, (0.95, 0.85, 0.3)), (wall, (0.6, 0.3, 0.25))
        ),
    }


@pytest.fixture(scope="module")
def pictures() -> dict[str, torch.Tensor]:
    """Three photographs and two pictures with large flat areas, RGB ``(1, 3, 256, 256)``."""
    return {**{name: photograph(name) for name in ("astronaut", "coffee", "chelsea")}, **flat_pictures()}


# ---------------------------------------------------------------------------------------------- codes
TIE = 2e-5  # the largest error of torch's own float32 restricted features against float64, relative to their norm
STAGES = {"lo": ("codes_lo", "restricted_codes_lo"), "hi": ("codes_hi", "restricted_codes_hi")}  # per codebook


def tie_distances(
    features: torch.Tensor, codes: torch.Tensor, chosen: torch.Tensor, other: torch.Tensor
) -> torch.Tensor:
    """``(N,)``: how far features ``(N, D)`` lie from the border between their ``chosen`` and ``other`` codes
    (indices ``(N,)`` into ``codes`` ``(K, D)``), relative to their norm, in float64: the relative change of a
    feature that makes ``other`` as near as ``chosen``. Within ``TIE``, float32 rounding decides between them."""
    z, chosen, other = features.double(), codes[chosen].double(), codes[other].double()
    gaps = (z - other).square().sum(1) - (z - chosen).square().sum(1)
    return gaps.abs() / (2 * (other - chosen).norm(dim=1)) / z.norm(dim=1)


class Ties:
    """Our model's four quantisations made to take given codes (the reference's or a runtime's) wherever ours
    differ from them only at ties, so that the comparison continues from the same codes. Use as a context manager;
    ``found`` lists ``(stage, positions, largest relative distance)`` of every tie taken."""

    def __init__(
        self, model: DsrModel, codes: dict[str, torch.Tensor], features: dict[str, torch.Tensor] | None = None
    ):
        """``codes``: stage (see :data:`STAGES`) → indices ``(B, h, w)``; ``features``: the same stages' features
        ``(B, D, h, w)`` where they chose them (the reference's), checked as ties as well as ours."""
        self.model, self.codes, self.features = model, codes, features or {}
        self.found: list[tuple[str, int, float]] = []

    def __enter__(self) -> Ties:
        for level, stages in STAGES.items():
            codebook = getattr(self.model.vq, f"codebook_{level}")
            codebook.nearest = self.forced(codebook, iter(stages))  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc) -> None:
        for level in STAGES:
            del getattr(self.model.vq, f"codebook_{level}").nearest

    def forced(self, codebook: EMACodebook, stages):
        own_nearest = codebook.nearest

        def nearest(z: torch.Tensor) -> torch.Tensor:
            stage = next(stages)
            ours, given = own_nearest(z), self.codes[stage].view(z.shape[0], *z.shape[2:])
            differ = (ours != given).flatten().nonzero().squeeze(1)
            if differ.numel():
                assert differ.numel() <= max(1, ours.numel() // 100), (stage, "more than 1 % of the codes differ")
                weights = codebook.embedding.weight
                flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                distances = tie_distances(flat[differ], weights, ours.flatten()[differ], given.flatten()[differ])
                if stage in self.features:
                    theirs = self.features[stage].permute(0, 2, 3, 1).reshape(-1, z.shape[1])[differ]
                    distances = torch.maximum(
                        distances, tie_distances(theirs, weights, given.flatten()[differ], ours.flatten()[differ])
                    )
                assert distances.max() < TIE, (stage, "not a tie: relative distances", distances.tolist())
                self.found.append((stage, differ.numel(), float(distances.max())))
            return given

        return nearest


# ---------------------------------------------------------------------------------------------------- tests
def test_layout_file_lists_our_modules_keys() -> None:
    """Every module's original-layout keys are exactly those of the released file (tiny widths)."""
    layout = read_layout()
    model = DsrModel(channels=8, res_hidden=4, num_embeddings=8, embedding_dim=8, decoder_bottleneck=4, unet_width=4)
    assert set(layout) == {f.file_name for f in ALL_FORMATS}
    for f in ALL_FORMATS:
        assert set(original_state(getattr(model, f.attribute), f)) == set(layout[f.file_name])


def test_authors_reference_has_the_released_layout() -> None:
    """The reference's modules have exactly the released files' keys and shapes (so they load them strictly)."""
    with torch.device("meta"):
        authors = AuthorsDsr(**PAPER_WIDTHS)
    layout = read_layout()
    assert set(AuthorsDsr.FILES) == set(layout)
    for file_name, attribute in AuthorsDsr.FILES.items():
        found = {key: tuple(value.shape) for key, value in getattr(authors, attribute).state_dict().items()}
        assert found == layout[file_name], file_name


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
    # exact by construction: import and export only copy tensors. NaN: the post-processor's empty statistics
    for key, tensor in states[0].items():
        torch.testing.assert_close(tensor, states[1][key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_export_refuses_to_mix_vq_models(tiny_ckpt: Path, tmp_path: Path) -> None:
    export_original(tiny_ckpt, tmp_path, CATEGORY)
    export_original(tiny_ckpt, tmp_path, "other")  # the same VQ-VAE: fine
    other = torch.load(tmp_path / VQ_FORMAT.file_name, weights_only=True)
    other["upsample_t.bias"] += 1
    torch.save(other, tmp_path / VQ_FORMAT.file_name)
    with pytest.raises(WeightsError, match="different general VQ-VAE"):
        export_original(tiny_ckpt, tmp_path, CATEGORY)


@torch.no_grad()
def test_tiny_model_matches_authors_inference(tiny_files: Path, tiny_widths: dict[str, int], pictures) -> None:
    """Tiny widths in float64, where rounding cannot hide a difference: RGB to the imported model, BGR to the
    authors' modules, the same pred_score and anomaly_map to 1e-9 (found: ~1e-11)."""
    model = load_original(tiny_files, CATEGORY).model.eval().double()
    authors = AuthorsDsr(**tiny_widths).load_files(read_states(tiny_files)).double()
    for name in ("astronaut", "flat_patch"):
        rgb = pictures[name].double()
        ours, reference = model(rgb), authors(rgb.flip(1))
        assert ours.anomaly_map.shape == (1, SIZE, SIZE)
        # Different kernels on each side, in float64 (eps 2.2e-16): the random tiny U-Nets' InstanceNorms amplify
        # rounding ~5e4x, to ~1e-11 in the map (seen 1.0-1.1e-11 with AVX-512 and with AVX2 kernels); 1e-9 leaves
        # 100x. Any one step done otherwise (a float32 op, a padding, a window) moves the map by 1e-7 or more.
        torch.testing.assert_close(ours.pred_score, reference["pred_score"], atol=1e-9, rtol=0, msg=name)
        torch.testing.assert_close(ours.anomaly_map, reference["anomaly_map"], atol=1e-9, rtol=0, msg=name)
        assert reference["anomaly_map"].std() > 1e-2, "a flat map would prove little"


@torch.no_grad()
def test_ties_take_only_codes_within_rounding(tiny_files: Path, pictures: dict[str, torch.Tensor]) -> None:
    """:class:`Ties` passes the model's own codes with no tie found, and refuses one code moved to another that is
    not within float32 rounding of the nearest: a real difference never passes as a tie."""
    model = load_original(tiny_files, CATEGORY).model.eval()
    rgb = pictures["astronaut"]
    own = own_codes(model, rgb)
    with Ties(model, own) as ties:
        model(rgb)
    assert ties.found == []  # exact by construction: the same encoder and restriction kernels on the same input
    moved = {**own, "codes_hi": own["codes_hi"].clone()}
    moved["codes_hi"].view(-1)[7] = (moved["codes_hi"].view(-1)[7] + 1) % model.vq.codebook_hi.num_embeddings
    with pytest.raises(AssertionError, match="not a tie"), Ties(model, moved):
        model(rgb)


@pytest.fixture(scope="module")
def imported(paper_ckpt: Path) -> Dsr:
    """The paper-width checkpoint written by ``anomalib-dsr import-original``, in eval mode."""
    return Dsr.load_from_checkpoint(paper_ckpt).eval()


@pytest.fixture(scope="module")
def authors_outputs(paper_files: Path, pictures: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The authors' inference at the paper's widths on each picture, given as BGR, batch 1 as in their test_dsr.py."""
    authors = AuthorsDsr(**PAPER_WIDTHS).load_files(read_states(paper_files))
    return {name: authors(rgb.flip(1)) for name, rgb in pictures.items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "convolutions"),
    [
        (torch.contiguous_format, "timed"),
        (torch.channels_last, "timed"),
        (torch.contiguous_format, "nnpack"),
        (torch.contiguous_format, "matmul"),
    ],
    ids=["nchw", "channels_last", "nchw-nnpack", "nchw-matrix-products"],
)
@torch.no_grad()
def test_imported_paper_model_matches_authors_inference(
    imported: Dsr,
    pictures: dict[str, torch.Tensor],
    authors_outputs: dict[str, dict[str, torch.Tensor]],
    layout: torch.memory_format,
    convolutions: str,
    force_algorithms,
) -> None:
    """Paper widths, 256x256, float32: pred_score within 1e-4, at most 0.1 % of map pixels off by more than 1e-3,
    every picture, from the same codes as the reference's.

    With random weights a few features lie as near two codes as float32 resolves, and MKL and oneDNN sum in a
    CPU-dependent order: on one CPU ours and the reference take the same code, on another not, and the U-Nets turn
    one code into another map (coffee on a Sapphire Rapids Xeon: one restricted code, 90 % of the map off by up to
    0.33). Where a code differs, :class:`Ties` asserts that the two codes are tied for both models' features (within
    ``TIE`` of their norm), gives ours the reference's, and the maps that follow are held to the same tolerances.

    ``channels_last`` is the layout of a picture made from an HWC array (``torch.from_numpy(hwc).permute(2, 0, 1)``);
    convolutions keep it. Before the fix of issue #11 every InstanceNorm then ran group_norm's channels_last kernel,
    which put the map off by up to 0.56 on 99 % of the pixels. On one core: 5 s per picture for the reference (once),
    4 s per picture and layout for ours.

    Which algorithms run after the last code choice depends on the CPU's timings, so each is also forced everywhere
    it may run.
    """
    if convolutions == "nnpack":  # NNPACK's Winograd for every 3x3 convolution after the last code choice
        force_algorithms(nnpack=True)
    elif convolutions == "matmul":  # every layer's matrix-product algorithm: tap sums, else Winograd; upsampling too
        force_algorithms("tap sums", "matrix-product Winograd", "matrix products")
    for name, rgb in pictures.items():
        reference = authors_outputs[name]
        assert reference["anomaly_map"].std() > 1e-2, "a flat map would prove little"
        codes = {
            stage: reference[stage][1]
            for stage in ("codes_lo", "codes_hi", "restricted_codes_lo", "restricted_codes_hi")
        }
        features = {stage: reference[stage][0] for stage in codes}
        with Ties(imported.model, codes, features) as ties:
            ours = imported.model(rgb.contiguous(memory_format=layout))
        assert ours.anomaly_map.shape == (1, SIZE, SIZE)
        assert_faithful(score_map_figures(reference, ours._asdict()), f"{name} (ties taken: {ties.found})")


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


@torch.no_grad()
def own_codes(model: DsrModel, rgb: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stage (see :data:`STAGES`) → the code indices ``(B, h, w)`` our model picks for ``rgb``."""
    vq = model.vq
    encoded = vq.encode(model.to_vq_input(rgb))
    return {
        "codes_lo": vq.codebook_lo.nearest(encoded.z_lo),
        "codes_hi": vq.codebook_hi.nearest(encoded.z_hi),
        "restricted_codes_lo": vq.codebook_lo.nearest(model.restriction_lo(encoded.q_lo)),
        "restricted_codes_hi": vq.codebook_hi.nearest(model.restriction_hi(encoded.q_hi)),
    }


def stages_of(model: DsrModel, rgb: torch.Tensor, runtime_codes: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """A runtime's four code outputs by stage: each is the stage whose codes in our model it is nearest to (graph
    order is the runtime's own)."""
    ours = {stage: codes.flatten() for stage, codes in own_codes(model, rgb).items()}
    seen: dict[str, torch.Tensor] = {}
    for codes in runtime_codes:
        codes = torch.from_numpy(codes.astype(np.int64)).flatten()
        stage = min((s for s in ours if ours[s].numel() == codes.numel()), key=lambda s: int((ours[s] != codes).sum()))
        seen[stage] = codes
    assert seen.keys() == ours.keys(), sorted(seen)
    return seen


@pytest.mark.slow
def test_exported_paper_model_matches_torch(imported: Dsr, pictures: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """OpenVINO (f32 precision) and ONNX Runtime run the exported imported model like PyTorch: score within 1e-4,
    at most 0.1 % of map pixels off by more than 1e-3; batch 1 per picture as in the authors' test_dsr.py.

    With these random weights some features lie as near two codes as float32 resolves (1e-6 of their norm);
    there a runtime whose convolutions round differently may take the other code, and the U-Nets turn one code
    into another map (OpenVINO 2026.4: one of chelsea's 1024 lo codes, or of coffee's 4096 restricted hi codes,
    moved 90–99 % of the map by up to 0.5). Each runtime returns its codes too; :class:`Ties` asserts that every
    code that differs from PyTorch's is a tie, gives PyTorch the runtime's, and every picture's score and map are
    then held to the tolerances. About 2.5 minutes on one core: two exports of 25–40 s, then 15 s a picture.
    """
    from anomalib.engine import Engine

    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False)
    export = {"export_root": tmp_path, "onnx_kwargs": dict(ONNX_KWARGS)}
    runtimes: dict[str, RunWithCodes] = {
        "openvino": openvino_with_codes(Path(engine.export(imported, "openvino", **export))),
        "onnxruntime": onnxruntime_with_codes(Path(engine.export(imported, "onnx", **export))),
    }
    for name, rgb in pictures.items():
        for runtime, run in runtimes.items():
            outputs, codes = run(rgb)
            with Ties(imported.model, stages_of(imported.model, rgb, codes)) as ties, torch.no_grad():
                expected = imported(rgb)._asdict()
            assert_faithful(score_map_figures(expected, outputs), f"{runtime} {name} (ties taken: {ties.found})")


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
