"""Lightning DDP: two CPU processes (gloo), ``strategy="ddp"``, through anomalib's ``Engine``.

Lightning's DDP launcher starts rank 1 by running the same script again, so training runs in a script
written by the test. Each rank gets 2 images per step (global batch 4, like the single-process run),
draws its own anomalies (``Dsr.on_train_start`` seeds each rank differently), and DDP averages the
gradients, so the ranks end with identical weights. Phase separation holds under DDP (each phase's
modules only change in their phase). The DDP model and a single-process model trained for as many
steps on the same generated dataset are compared on what 16 phase-2 steps measurably improve: the error
of I_spc against its input on the training images (the phase-2 loss's reconstruction term, weight 10).
Those steps lower it from 0.258 to 0.240, and DDP must lower it about as much as the single process.
AUROC and AP stay near chance after 24 steps of a tiny model and differ between runs and CPUs, so they
are not compared. The test catches a DDP run that fails, hangs, desynchronises the ranks, mixes the
phases or diverges.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from conftest import CATEGORY, IMAGE_SIZE, TINY_WIDTHS, TRAINER_KWARGS

MAX_STEPS = 24  # 16 phase-2 steps, 8 phase-3 steps
LR = 1e-3
GAIN_RATIO = (0.5, 2.0)  # DDP's lowering of the I_spc error, relative to the single-process run's (seen: 1.006)
ROOT = Path(__file__).resolve().parents[1]
PHASE2_MODULES = ("restriction_lo", "restriction_hi", "object_decoder", "anomaly_detection")

SCRIPT = """
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything
import anomalib_dsr.model.lightning_model as lightning_model
from anomalib_dsr import Dsr

data_root, vq, out = sys.argv[1:4]
masks = []
perlin_masks = lightning_model.perlin_masks
def recording(*args, **kwargs):  # the phase-2 anomaly masks this rank draws
    result = perlin_masks(*args, **kwargs)
    masks.append(result.clone())
    return result
lightning_model.perlin_masks = recording

snapshots = {{}}
class Snapshot(Callback):
    def on_train_start(self, trainer, pl_module):
        snapshots["start"] = {{k: v.clone() for k, v in pl_module.model.state_dict().items()}}
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == pl_module.phase2_steps:
            snapshots["switch"] = {{k: v.clone() for k, v in pl_module.model.state_dict().items()}}

seed_everything(0)
model = Dsr(vq_weights=vq, pre_processor=Dsr.configure_pre_processor(({size}, {size})), visualizer=False,
            learning_rate={lr}, **{widths})
engine = Engine(default_root_dir=Path(out) / "results", max_steps={max_steps}, callbacks=[Snapshot()],
                accelerator="cpu", devices=2, strategy="ddp", enable_progress_bar=False, enable_model_summary=False)
datamodule = MVTecAD(root=data_root, category="{category}", train_batch_size=2, eval_batch_size=4, num_workers=0)
engine.fit(model, datamodule=datamodule)
torch.save({{"masks": masks, "snapshots": snapshots, "state": model.model.state_dict(),
            "phase2_steps": model.phase2_steps, "global_step": model.global_step,
            "world_size": engine.trainer.world_size}}, Path(out) / f"rank{{engine.trainer.global_rank}}.pt")
""".format(size=IMAGE_SIZE, lr=LR, widths=TINY_WIDTHS, max_steps=MAX_STEPS, category=CATEGORY)


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix + "."))


def reconstruction_error(make_dsr, state: dict[str, torch.Tensor], images: torch.Tensor) -> float:
    """Mean squared error of I_spc against ``images`` ``(N, 3, H, W)`` for the model weights ``state``."""
    model = make_dsr()
    model.model.load_state_dict(state)
    with torch.no_grad():
        image_spc, _, _ = model.model.eval().detect(images)
    return float((image_spc - images).square().mean())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_two_cpu_processes_matches_single_process(make_dsr, make_datamodule, demo_root, vq_weights, tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, str(script), str(demo_root), str(vq_weights), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in (0, 1)]

    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["global_step"] == MAX_STEPS
        assert rank["phase2_steps"] == 16  # the phase split counts optimisation steps, not per-rank batches
        assert len(rank["masks"]) == 16 and all(m.shape[0] == 2 for m in rank["masks"])
    # Each rank draws its own anomalies...
    # (half the masks are empty by design: equal empty batches on both ranks are allowed)
    pairs = list(zip(ranks[0]["masks"], ranks[1]["masks"], strict=True))
    assert all(not torch.equal(a, b) or a.sum() == 0 for a, b in pairs)
    assert sum(not torch.equal(a, b) for a, b in pairs) >= len(pairs) // 2
    # ...and DDP keeps the weights in sync, bit for bit by construction: all-reduce hands every rank the same
    # averaged gradient, and each applies the same Adam kernel to the same weights on the same CPU.
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    start, switch, end = (ranks[0]["snapshots"]["start"], ranks[0]["snapshots"]["switch"], ranks[0]["state"])
    for name in PHASE2_MODULES:
        assert changed(start, switch, name) and not changed(switch, end, name), name
    assert not changed(start, switch, "upsampling") and changed(switch, end, "upsampling")
    assert not changed(start, end, "vq")

    seed_everything(0)
    single = make_dsr(learning_rate=LR)
    Engine(default_root_dir=tmp_path / "single", max_steps=MAX_STEPS, **TRAINER_KWARGS).fit(
        single, datamodule=make_datamodule(train_batch_size=4)
    )
    train_images = sorted((demo_root / CATEGORY / "train" / "good").glob("*.png"))
    images = torch.stack([read_image(path, as_tensor=True) for path in train_images])
    states = {"start": start, "ddp": end, "single": single.model.state_dict()}
    errors = {name: reconstruction_error(make_dsr, state, images) for name, state in states.items()}
    print("I_spc error on the training images:", errors)
    gain_ddp, gain_single = errors["start"] - errors["ddp"], errors["start"] - errors["single"]
    assert gain_single > 0, errors
    assert GAIN_RATIO[0] <= gain_ddp / gain_single <= GAIN_RATIO[1], errors
