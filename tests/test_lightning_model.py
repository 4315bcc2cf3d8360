"""The anomalib module ``Dsr`` (docs/method.md#training): step-based phases, LR schedule, checks, logging, resuming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_dsr import Dsr
from anomalib_dsr.model.original_format import VQ_FORMAT, original_state, read_state_dict

from conftest import IMAGE_SIZE, TRAINER_KWARGS, StopAt

PHASE2_MODULES = ("restriction_lo", "restriction_hi", "object_decoder", "anomaly_detection")
IMAGENET_NORMALIZE = Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def snapshot(module: Dsr) -> dict[str, dict[str, torch.Tensor]]:
    names = (*PHASE2_MODULES, "upsampling", "vq")
    return {
        name: {k: v.detach().clone() for k, v in getattr(module.model, name).state_dict().items()} for name in names
    }


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


class Recorder(Callback):
    """Per optimisation step: the phase, each param group's LR, the logged phase; weights at phase edges."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.phases: list[int] = []
        self.lrs: list[list[float]] = []
        self.logged_phases: list[float] = []
        self.vq_training: list[bool] = []
        self.snapshots: dict[str, dict] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.snapshots["start"] = snapshot(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == pl_module.phase2_steps:
            self.snapshots["switch"] = snapshot(pl_module)
        self.steps.append(trainer.global_step)
        self.phases.append(pl_module.phase)
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])
        self.vq_training.append(any(m.training for m in pl_module.model.vq.modules()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logged_phases.append(float(trainer.callback_metrics["train/phase"]))

    def on_train_end(self, trainer, pl_module) -> None:
        self.snapshots["end"] = snapshot(pl_module)


def engine(root: Path, callbacks: list[Callback] | None = None, **kwargs) -> Engine:
    return Engine(callbacks=callbacks or [], default_root_dir=root, **TRAINER_KWARGS, **kwargs)


# ------------------------------------------------------------------------------------ schedule and phases
def test_phases_switch_by_step_and_lr_decays_after_80_percent_of_phase2(
    make_dsr, make_datamodule, tmp_path, vq_weights
):
    """max_steps=15 → 10 phase-2 steps (2:1), LR x0.1 from step 8 in the phase-2 group only."""
    lr = 1e-3
    model = make_dsr(learning_rate=lr)
    recorder = Recorder()
    engine(tmp_path, [recorder], max_steps=15).fit(model, datamodule=make_datamodule())

    assert model.phase2_steps == 10
    assert recorder.steps == list(range(15))
    assert recorder.phases == [2] * 10 + [3] * 5
    assert recorder.logged_phases == [float(p) for p in recorder.phases]  # train/phase is logged per step
    assert not any(recorder.vq_training), "the VQ-VAE must stay in eval mode while training"

    phase2_lr = [lrs[0] for lrs in recorder.lrs[:10]]
    assert phase2_lr[:8] == [pytest.approx(lr, rel=1e-12)] * 8
    assert phase2_lr[8:] == [pytest.approx(0.1 * lr, rel=1e-12)] * 2
    assert [lrs[1] for lrs in recorder.lrs] == [pytest.approx(lr, rel=1e-12)] * 15  # phase 3: constant

    start, switch, end = (recorder.snapshots[k] for k in ("start", "switch", "end"))
    for name in PHASE2_MODULES:
        assert changed(start[name], switch[name]), f"{name} did not train in phase 2"
        assert not changed(switch[name], end[name]), f"{name} changed in phase 3"
    assert not changed(start["upsampling"], switch["upsampling"]), "upsampling module changed in phase 2"
    assert changed(switch["upsampling"], end["upsampling"]), "upsampling module did not train in phase 3"
    assert not changed(start["vq"], end["vq"])
    # The frozen VQ-VAE is exactly the file's.
    state = read_state_dict(vq_weights)
    for key, value in original_state(model.model.vq, VQ_FORMAT).items():
        assert torch.equal(value, state[key]), key


def test_one_epoch_trains_both_phases(make_dsr, make_datamodule, tmp_path):
    """A ``max_epochs=1`` run (4 steps of batch 2 on 8 images) still trains phase 2 then phase 3."""
    model = make_dsr()
    recorder = Recorder()
    engine(tmp_path, [recorder], max_epochs=1).fit(model, datamodule=make_datamodule(train_batch_size=2))
    assert len(recorder.steps) == 4
    assert model.phase2_steps == round(4 * 2 / 3)
    assert recorder.phases == [2] * model.phase2_steps + [3] * (4 - model.phase2_steps)
    start, switch, end = (recorder.snapshots[k] for k in ("start", "switch", "end"))
    assert changed(start["anomaly_detection"], switch["anomaly_detection"])
    assert changed(switch["upsampling"], end["upsampling"])


def test_phase_ratio_sets_the_split(make_dsr, make_datamodule, tmp_path):
    model = make_dsr(phase_ratio=1.0)
    recorder = Recorder()
    engine(tmp_path, [recorder], max_steps=6).fit(model, datamodule=make_datamodule())
    assert model.phase2_steps == 3
    assert recorder.phases == [2, 2, 2, 3, 3, 3]


def test_too_few_steps_and_bad_ratio_are_refused(make_dsr, make_datamodule, tmp_path):
    with pytest.raises(ValueError, match="at least 2 training steps"):
        engine(tmp_path, max_steps=1).fit(make_dsr(), datamodule=make_datamodule())
    for ratio in (0.0, -2.0):
        with pytest.raises(ValueError, match="phase_ratio must be positive"):
            make_dsr(phase_ratio=ratio)


# ------------------------------------------------------------------------------------- configuration checks
@pytest.mark.parametrize(
    "transform",
    [
        Compose([Resize((IMAGE_SIZE, IMAGE_SIZE)), IMAGENET_NORMALIZE]),
        Compose([Compose([Resize((IMAGE_SIZE, IMAGE_SIZE))]), Compose([IMAGENET_NORMALIZE])]),
        IMAGENET_NORMALIZE,
    ],
)
def test_normalize_in_pre_processor_is_refused_at_construction(vq_weights, tiny_widths, transform):
    with pytest.raises(ValueError, match="without mean/std normalisation.*Normalize"):
        Dsr(vq_weights=vq_weights, pre_processor=PreProcessor(transform=transform), **tiny_widths)


def test_default_pre_processor_has_no_normalize_and_resizes_to_256(vq_weights, tiny_widths):
    model = Dsr(vq_weights=vq_weights, **tiny_widths)
    out = model.pre_processor.transform(torch.rand(1, 3, 100, 120))
    assert out.shape[-2:] == (256, 256)
    assert 0 <= out.min() and out.max() <= 1


def test_normalize_in_datamodule_augmentations_is_refused_when_fitting(make_dsr, make_datamodule, tmp_path):
    datamodule = make_datamodule(train_augmentations=IMAGENET_NORMALIZE)
    with pytest.raises(ValueError, match="without mean/std normalisation.*Normalize"):
        engine(tmp_path, max_steps=4).fit(make_dsr(), datamodule=datamodule)


def test_missing_vq_file_names_path_and_pretrain_command(make_dsr, make_datamodule, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "vq.pckl"
    with pytest.raises(FileNotFoundError) as error:
        make_dsr(vq_weights=missing).load_vq_weights()
    assert str(missing) in str(error.value)
    assert "anomalib-dsr pretrain-vq" in str(error.value)

    # Fitting fails the same way, before any step.
    with pytest.raises(FileNotFoundError, match="anomalib-dsr pretrain-vq"):
        engine(tmp_path, max_steps=4).fit(make_dsr(vq_weights=missing), datamodule=make_datamodule())

    # Without vq_weights, anomalib's pretrained-weights folder is used (never downloaded).
    monkeypatch.setattr("anomalib_dsr.model.lightning_model.get_pretrained_weights_dir", lambda: tmp_path / "cache")
    with pytest.raises(FileNotFoundError) as error:
        make_dsr(vq_weights=None).load_vq_weights()
    assert str(tmp_path / "cache" / "dsr" / "vq_model_pretrained_128_4096.pckl") in str(error.value)


# -------------------------------------------------------------------------------------------------- resuming
def test_resume_from_checkpoint_matches_uninterrupted_run(make_dsr, make_datamodule, tmp_path):
    """8 steps (5 in phase 2) straight, versus 4 steps, stop, resume from last.ckpt: same final weights.

    The checkpoint is at an epoch end (2 batches per epoch): mid-epoch, Lightning cannot resume a plain
    DataLoader exactly. Tolerance: 1e-6 absolute (CPU runs are bitwise equal; a different random
    stream after resuming changes the weights by ~1e-3).
    """
    max_steps = 8

    def run(tag: str, callbacks: list[Callback], ckpt_path: Path | None = None, **overrides) -> Dsr:
        seed_everything(0)
        model = make_dsr(**overrides)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / tag, every_n_train_steps=2, save_last=True)
        engine(tmp_path / f"results_{tag}", [checkpoint, *callbacks], max_steps=max_steps).fit(
            model, datamodule=make_datamodule(), ckpt_path=ckpt_path
        )
        return model

    straight = run("straight", [])
    assert straight.global_step == max_steps
    interrupted = run("interrupted", [StopAt(4)])
    assert interrupted.global_step == 4
    last = tmp_path / "interrupted" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4

    # The resumed run takes everything from the checkpoint, the VQ-VAE included: no VQ file needed.
    recorder = Recorder()
    resumed = run("resumed", [recorder], ckpt_path=last, vq_weights=tmp_path / "absent.pckl")
    assert recorder.steps == [4, 5, 6, 7]
    assert resumed.phase2_steps == straight.phase2_steps == 5
    assert recorder.phases == [2, 3, 3, 3]

    expected, actual = straight.state_dict(), resumed.state_dict()
    assert set(expected) == set(actual)
    # Bitwise equal by construction: one process, one thread, training's kernels (nn.Conv2d's; the timed choices of
    # inference are process-wide, so validation runs alike too), weights, Adam state and RNG restored bit for bit.
    # 1e-6 only as a margin: a wrong RNG stream or a lost step moves weights by ~1e-3.
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)
    assert changed(interrupted.model.upsampling.state_dict(), resumed.model.upsampling.state_dict())


def test_vq_is_loaded_even_if_the_trainer_last_ran_from_a_checkpoint(make_dsr, make_datamodule, tmp_path, vq_weights):
    """Lightning keeps ``trainer.ckpt_path`` from the previous run until the next run restores: a fresh
    model fitted after ``test(ckpt_path=...)`` on the same engine must still get the VQ file's weights."""
    datamodule = make_datamodule()
    eng = engine(tmp_path, max_steps=2)
    first = make_dsr()
    eng.fit(first, datamodule=datamodule)
    eng.test(first, datamodule=datamodule, ckpt_path=eng.best_model_path, verbose=False)
    second = make_dsr()
    eng.fit(second, datamodule=datamodule)
    state = read_state_dict(vq_weights)
    for key, value in original_state(second.model.vq, VQ_FORMAT).items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("extra_eval_module", [False, True], ids=["frozen_vq_only", "another_module_in_eval"])
def test_eval_mode_warning_only_for_modules_other_than_the_frozen_vq(
    make_dsr, make_datamodule, tmp_path, extra_eval_module: bool
):
    """Lightning's "module(s) in eval mode" warning is silent for the frozen VQ-VAE alone, still raised when
    another module is left in eval mode, and the filter does not outlive the start of training."""
    import warnings

    model = make_dsr()
    if extra_eval_module:
        model.model.upsampling.encoder.block1.eval()  # a Sequential and its 6 layers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine(tmp_path, max_steps=2).fit(model, datamodule=make_datamodule())
        remaining = list(warnings.filters)
    eval_warnings = [str(w.message) for w in caught if "in eval mode at the start of training" in str(w.message)]
    if extra_eval_module:
        expected = len(list(model.model.vq.modules())) + 7
        assert len(eval_warnings) == 1 and eval_warnings[0].startswith(f"Found {expected} module(s)"), eval_warnings
    else:
        assert eval_warnings == []
    assert not any(f[1] is not None and "in eval mode" in f[1].pattern for f in remaining)


PRECISION_CASES = [  # setting, whether the CPU has native bf16, the dtype training steps run in
    ("auto", True, torch.bfloat16),
    ("auto", False, torch.float32),
    ("fp32", True, torch.float32),
    ("bf16", False, torch.bfloat16),
]


@pytest.mark.parametrize(("setting", "native", "dtype"), PRECISION_CASES)
def test_training_precision_sets_the_dtype_of_training_steps_only(
    make_dsr, make_datamodule, tmp_path, monkeypatch, setting, native, dtype
):
    """``training_precision`` decides the decoders' and U-Nets' dtype in training steps ("auto": by the CPU, here
    faked); validation stays fp32. A wrong value is refused when the model is built."""
    import anomalib_dsr.model.lightning_model as lightning_model

    chosen = "bf16" if native else "fp32"
    monkeypatch.setattr(
        lightning_model, "resolve_training_precision", lambda value, _: chosen if value == "auto" else value
    )
    model = make_dsr(training_precision=setting)
    seen: list[tuple[bool, torch.dtype]] = []
    for module in (model.model.object_decoder, model.model.upsampling):
        module.register_forward_hook(lambda module, args, out: seen.append((module.training, out.dtype)))
    engine = Engine(max_steps=3, default_root_dir=tmp_path, logger=False, limit_val_batches=1, **TRAINER_KWARGS)
    engine.fit(model, datamodule=make_datamodule())
    trained = [dtype_ for training, dtype_ in seen if training]
    validated = [dtype_ for training, dtype_ in seen if not training]
    assert trained and set(trained) == {dtype}  # phase 2's D_spc and phase 3's upsampling U-Net
    assert validated and set(validated) == {torch.float32}
    with pytest.raises(ValueError, match="training_precision must be one of"):
        make_dsr(training_precision="16-mixed")


def test_general_decoder_trains_without_d_spc_and_refuses_the_authors_layout(make_dsr, make_datamodule, tmp_path):
    """``spc_decoder="general"``: phase 2 trains the restriction modules and the anomaly detection U-Net only (D_gen
    stays frozen), and the authors' six-file layout, which needs a D_spc, is refused with the reason."""
    from anomalib_dsr.checkpoints.original_checkpoint import save_original
    from anomalib_dsr.model.original_format import WeightsError

    model = make_dsr(spc_decoder="general")
    model.load_vq_weights()  # as fitting will: the weights D_gen must keep
    frozen = {key: value.clone() for key, value in model.model.vq.state_dict().items()}
    restriction = [p.clone() for p in model.model.restriction_hi.parameters()]
    engine = Engine(max_steps=3, default_root_dir=tmp_path, logger=False, limit_val_batches=0, **TRAINER_KWARGS)
    engine.fit(model, datamodule=make_datamodule())
    phase2 = model.optimizers().param_groups[0]["params"]
    expected = [*model.model.restriction_lo.parameters(), *model.model.restriction_hi.parameters(),
                *model.model.anomaly_detection.parameters()]  # fmt: skip
    assert {id(p) for p in phase2} == {id(p) for p in expected}
    assert any(not torch.equal(a, b) for a, b in zip(restriction, model.model.restriction_hi.parameters()))
    for key, value in model.model.vq.state_dict().items():
        assert torch.equal(value, frozen[key]), key  # exact: frozen weights are never written
    with pytest.raises(WeightsError, match=r"spc_decoder='general'.*DSR_image_recon_module"):
        save_original(model.model, tmp_path / "original", "gravel")
