"""Killing a training run (SIGKILL, Ctrl-C) in phase 2 or 3 and resuming from ``last.ckpt`` gives the
weights of an uninterrupted run; VQ pretraining resumes the same way.

Training runs in a subprocess (a script written by the test) with a ``ModelCheckpoint(save_last=True,
every_n_train_steps=2)`` like the one ``configs/dsr.yaml`` enables. 8 images, batch 4: 2 steps per epoch,
so every checkpoint is at an epoch end, where Lightning resumes a plain DataLoader exactly (mid-epoch it
restarts the epoch's data). The script pauses at the start of a chosen step, after that step's
checkpoint exists; the test then sends the signal. Tolerance of the comparison: 1e-6 absolute (on the
CPU the runs are bitwise equal; a different random stream changes weights by ~1e-3).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from anomalib_dsr.workflows.pretrain_vq import pretrain_vq

from conftest import CATEGORY, IMAGE_SIZE, TINY_WIDTHS, TRAINER_KWARGS, VQ_WIDTHS, StopAt

MAX_STEPS = 12  # 8 phase-2 steps (LR x0.1 from step 6), then 4 phase-3 steps
LR = 1e-3
# Bitwise equal by construction: the same CPU, one torch thread in every process (conftest, the script), training's
# kernels only (nn.Conv2d's: training never takes the timed inference algorithms), and weights, Adam state and RNG
# restored bit for bit. 1e-6 only as a margin: a wrong RNG stream or a lost step moves weights by ~1e-3.
ATOL = 1e-6
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from anomalib_dsr import Dsr

data_root, vq, ckpt_dir, results, pause_at, ckpt_path = sys.argv[1:7]
pause_at = int(pause_at)

class PauseAt(Callback):
    # Blocks at the start of step `pause_at` (the previous step's checkpoint is written) until killed.
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == pause_at:
            Path(ckpt_dir, "paused").write_text(str(pause_at))
            time.sleep(600)

seed_everything(0)
model = Dsr(vq_weights=vq, pre_processor=Dsr.configure_pre_processor(({size}, {size})), visualizer=False,
            learning_rate={lr}, **{widths})
checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_last=True)
engine = Engine(default_root_dir=results, callbacks=[checkpoint, PauseAt()], max_steps={max_steps},
                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
datamodule = MVTecAD(root=data_root, category="{category}", train_batch_size=4, eval_batch_size=4, num_workers=0)
engine.fit(model, datamodule=datamodule, ckpt_path=None if ckpt_path == "-" else ckpt_path)
""".format(size=IMAGE_SIZE, lr=LR, widths=TINY_WIDTHS, max_steps=MAX_STEPS, category=CATEGORY)


class Recorder(Callback):
    """Per step: the phase and both param groups' LRs."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.phases: list[int] = []
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(trainer.global_step)
        self.phases.append(pl_module.phase)
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])


def run_in_process(make_dsr, make_datamodule, root: Path, ckpt_path: Path | None = None):
    seed_everything(0)
    model = make_dsr(learning_rate=LR)
    recorder = Recorder()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True)
    engine = Engine(
        default_root_dir=root / "results", callbacks=[checkpoint, recorder], max_steps=MAX_STEPS, **TRAINER_KWARGS
    )
    engine.fit(model, datamodule=make_datamodule(), ckpt_path=ckpt_path)
    return model, recorder, engine.trainer.optimizers[0].state_dict()


def interrupt(script: Path, args: list[str], ckpt_dir: Path, pause_at: int, sig: signal.Signals) -> None:
    """Run the script until it pauses at ``pause_at``, send ``sig``, check how it ended and the checkpoint."""
    marker = ckpt_dir / "paused"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [sys.executable, str(script), *args[:4], str(pause_at), args[4]],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A test runner started in the background may ignore SIGINT, and children inherit that: restore it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"training script ended or hung before step {pause_at}:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.2)
    process.send_signal(sig)
    try:
        output = process.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"training script did not stop within 120 s of {sig.name}:\n{process.communicate()[0][-3000:]}")
    if sig == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:  # Ctrl-C: Lightning shuts down gracefully and exits with status 1
        assert process.returncode == 1, output[-3000:]
        assert "Detected KeyboardInterrupt" in output, output[-3000:]
    checkpoint = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == pause_at


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "second"),
    [((4, signal.SIGKILL), (10, signal.SIGINT)), ((6, signal.SIGINT), (10, signal.SIGKILL))],
    ids=["kill-phase2_ctrlc-phase3", "ctrlc-phase2_kill-phase3"],
)
def test_killed_in_phase_2_and_3_then_resumed_matches_uninterrupted(
    make_dsr, make_datamodule, demo_root: Path, vq_weights: Path, tmp_path: Path, first, second
) -> None:
    straight, straight_rec, straight_opt = run_in_process(make_dsr, make_datamodule, tmp_path / "straight")
    assert straight.phase2_steps == 8
    assert straight_rec.phases == [2] * 8 + [3] * 4

    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    ckpt_dir = tmp_path / "ckpt"
    args = [str(demo_root), str(vq_weights), str(ckpt_dir), str(tmp_path / "results")]
    last = ckpt_dir / "last.ckpt"

    (step1, sig1), (step2, sig2) = first, second
    interrupt(script, [*args, "-"], ckpt_dir, step1, sig1)  # phase 2
    interrupt(script, [*args, str(last)], ckpt_dir, step2, sig2)  # resumed, then interrupted in phase 3
    assert torch.load(last, map_location="cpu", weights_only=False)["dsr_phase2_steps"] == 8

    # Resume once more, in this process, to the end: the VQ-VAE and everything else come from the checkpoint.
    resumed, rec, resumed_opt = run_in_process(
        lambda **kw: make_dsr(vq_weights=tmp_path / "absent.pckl", **kw), make_datamodule, tmp_path / "resumed", last
    )
    assert rec.steps == list(range(step2, MAX_STEPS))
    assert rec.phases == straight_rec.phases[step2:]  # right phase
    assert rec.lrs == straight_rec.lrs[step2:]  # right LR in both param groups

    expected, actual = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=ATOL, msg=key)
    # Adam's moments and step counts too.
    for index, state in straight_opt["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(
                resumed_opt["state"][index][name], value, rtol=0, atol=ATOL, msg=f"{index}.{name}"
            )


def test_default_config_writes_a_resumable_last_checkpoint() -> None:
    config = yaml.safe_load((ROOT / "configs" / "dsr.yaml").read_text())
    callbacks = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert len(callbacks) == 1
    init = callbacks[0]["init_args"]
    assert init["save_last"] is True
    assert 0 < init["every_n_train_steps"] <= config["trainer"]["max_steps"] // 10
    assert isinstance(config["seed_everything"], int)  # resuming reproduces the run only with a fixed seed


def test_vq_pretraining_resumes_exactly(demo_root: Path, tmp_path: Path) -> None:
    """8 steps straight versus 4 steps, stop, and the same command again (resumes from last.ckpt): same
    weights (tolerance 1e-6; the RNG state in the checkpoint makes data order and code restarts match)."""
    images = [demo_root / CATEGORY / "train" / "good"]
    kwargs = {"image_size": IMAGE_SIZE, "max_steps": 8, "batch_size": 4, "seed": 0, **VQ_WIDTHS}
    straight = pretrain_vq(
        images, tmp_path / "straight.pckl", resume=False, trainer_kwargs=dict(TRAINER_KWARGS), **kwargs
    )
    out = tmp_path / "resumed.pckl"
    pretrain_vq(images, out, trainer_kwargs={**TRAINER_KWARGS, "callbacks": [StopAt(4)]}, **kwargs)
    last = tmp_path / "resumed_checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    pretrain_vq(images, out, trainer_kwargs=dict(TRAINER_KWARGS), **kwargs)
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 8
    expected = torch.load(straight, weights_only=True)
    actual = torch.load(out, weights_only=True)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=ATOL, msg=key)
