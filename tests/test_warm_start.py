"""Warm start: phases 2 and 3 trained on general images, stored in float16, loaded when fitting starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback

from anomalib_dsr.model.original_format import WeightsError
from anomalib_dsr.model.warm_start import FINGERPRINT, WARM_MODULES, load_warm_start
from anomalib_dsr.workflows.pretrain_warm_start import pretrain_warm_start

from conftest import IMAGE_SIZE, TRAINER_KWARGS


@pytest.fixture(scope="module")
def warm_file(tmp_path_factory: pytest.TempPathFactory, vq_weights: Path, tiny_widths: dict[str, int]) -> Path:
    """A warm start of the tiny model: 4 steps on the general photographs (3 in phase 2, 1 in phase 3)."""
    output = tmp_path_factory.mktemp("warm") / "warm.pt"
    arguments = {"vq_weights": vq_weights, "image_size": IMAGE_SIZE, **tiny_widths}
    kwargs = {k: v for k, v in TRAINER_KWARGS.items() if k != "enable_model_summary"}
    return pretrain_warm_start(output, arguments, max_steps=4, batch_size=2, resume=False, trainer_kwargs=kwargs)


def test_file_holds_the_trained_modules_in_float16(warm_file: Path, make_dsr) -> None:
    state = torch.load(warm_file, weights_only=True)
    model = make_dsr().model
    for name in WARM_MODULES:
        keys = {f"{name}.{key}" for key in getattr(model, name).state_dict()}
        assert keys <= state.keys(), name
    assert {value.dtype for key, value in state.items() if key != FINGERPRINT} == {torch.float16}
    # Trained, not the initialisation (the same seed draws the same one): Adam's first step moves the weights by up
    # to its LR (2e-4), phase 3's one step included; float16 rounds these weights (< 0.1) by at most 3e-5.
    torch.manual_seed(0)
    fresh = make_dsr().model
    for name in ("restriction_lo", "anomaly_detection", "upsampling"):
        key = next(k for k, v in getattr(fresh, name).state_dict().items() if v.ndim == 4)
        moved = (state[f"{name}.{key}"].float() - getattr(fresh, name).state_dict()[key]).abs().amax()
        assert moved > 1.5e-4, (name, moved)


class FirstWeights(Callback):
    """The model's warm-startable weights when training starts (after ``on_fit_start`` loaded them)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items() if not k.startswith("vq.")}


def test_fit_starts_from_the_file_and_fine_tunes(warm_file: Path, make_dsr, make_datamodule, tmp_path) -> None:
    model, first = make_dsr(warm_start=warm_file), FirstWeights()
    engine = Engine(max_steps=2, default_root_dir=tmp_path, logger=False, limit_val_batches=0, callbacks=[first],
                    **TRAINER_KWARGS)  # fmt: skip
    engine.fit(model, datamodule=make_datamodule())
    state = torch.load(warm_file, weights_only=True)
    for key, value in first.state.items():
        # exact: float16 → float32 is exact, and nothing ran between loading and this callback
        assert torch.equal(value, state[key].float()), key
    moved = model.model.restriction_lo.state_dict()
    assert any(not torch.equal(moved[k], first.state[f"restriction_lo.{k}"]) for k in moved)  # fine-tuned


def test_a_general_decoder_model_takes_the_file_without_its_d_spc(warm_file: Path, make_dsr) -> None:
    model = make_dsr(spc_decoder="general")
    model.load_vq_weights()
    load_warm_start(model.model, warm_file)
    state = torch.load(warm_file, weights_only=True)
    for key, value in model.model.upsampling.state_dict().items():
        assert torch.equal(value, state[f"upsampling.{key}"].float())  # exact: an fp16 → fp32 copy


def test_wrong_widths_vq_or_file_are_refused(warm_file: Path, make_dsr, vq_weights: Path, tmp_path: Path) -> None:
    wider = make_dsr(unet_width=16)
    wider.load_vq_weights()
    with pytest.raises(WeightsError, match=r"warm.pt was trained with other widths.*anomaly_detection\.\S+ is \(8,"):
        load_warm_start(wider.model, warm_file)

    model = make_dsr()
    model.load_vq_weights()
    state = torch.load(warm_file, weights_only=True)
    fingerprint = state[FINGERPRINT]
    state[FINGERPRINT] = fingerprint + 1
    torch.save(state, other := tmp_path / "other_vq.pt")
    with pytest.raises(WeightsError, match="other_vq.pt was trained on another general VQ-VAE"):
        load_warm_start(model.model, other)
    with pytest.raises(WeightsError, match=r"vq_tiny.pckl is not a DSR warm-start file.*pretrain-warm-start"):
        load_warm_start(model.model, vq_weights)
    del state["upsampling.encoder.block1.0.weight"]
    state[FINGERPRINT] = fingerprint
    torch.save(state, partial := tmp_path / "partial.pt")
    with pytest.raises(WeightsError, match=r"partial.pt does not fit this model's upsampling: missing \['encoder"):
        load_warm_start(model.model, partial)


def test_cli_trains_a_recipe_s_warm_start(
    vq_weights: Path, tiny_widths: dict[str, int], tmp_path: Path, capsys
) -> None:
    import yaml

    from anomalib_dsr.cli import main

    recipe = tmp_path / "recipe.yaml"
    init_args = {"vq_weights": str(vq_weights), "image_size": IMAGE_SIZE, **tiny_widths, "warm_start": "old.pt"}
    recipe.write_text(yaml.safe_dump({"model": {"class_path": "anomalib_dsr.Dsr", "init_args": init_args}}))
    output = tmp_path / "warm.pt"
    main(["pretrain-warm-start", "--config", str(recipe), "--output", str(output), "--max-steps", "2",
          "--batch-size", "2", "--accelerator", "cpu"])  # fmt: skip
    assert f"Warm start written to {output}" in capsys.readouterr().out
    assert FINGERPRINT in torch.load(output, weights_only=True)  # the recipe's own warm_start is not needed
    recipe.write_text("trainer: {max_steps: 10}\n")
    with pytest.raises(SystemExit, match=r"recipe.yaml is not a recipe with model.init_args"):
        main(["pretrain-warm-start", "--config", str(recipe), "--output", str(output)])


def test_the_shipped_file_fits_the_cpu_recipe() -> None:
    """``anomalib_dsr/weights/dsr_warm_start_32_1024.pt`` loads into ``configs/dsr_cpu.yaml``'s model (its VQ-VAE and
    widths), in float16 within the 20 MB the package allows it."""
    import yaml

    from anomalib_dsr import Dsr

    root = Path(__file__).resolve().parents[1]
    shipped = root / "anomalib_dsr" / "weights" / "dsr_warm_start_32_1024.pt"
    assert shipped.stat().st_size < 20e6
    recipe = yaml.safe_load((root / "configs" / "dsr_cpu.yaml").read_text())["model"]["init_args"]
    recipe["vq_weights"] = root / recipe["vq_weights"]
    model = Dsr(**recipe, warm_start=shipped)
    model.load_vq_weights()
    load_warm_start(model.model, shipped)
    state = torch.load(shipped, weights_only=True)
    assert {value.dtype for key, value in state.items() if key != FINGERPRINT} == {torch.float16}
