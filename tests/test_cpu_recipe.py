"""``configs/dsr_cpu.yaml``, the CPU recipe: the anomalib CLI builds it as written, and the real-defect benchmark
configs train DSR with the same recipe (only ELPV's aligned cells drop the rotations, chosen on its validation
split)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from anomalib.cli import AnomalibCLI
from anomalib.data import MVTecAD

from anomalib_dsr import Dsr

ROOT = Path(__file__).resolve().parents[1]
RECIPE = yaml.safe_load((ROOT / "configs" / "dsr_cpu.yaml").read_text())
# Benchmark config -> the recipe's arguments it may set otherwise, and why.
BENCHMARKS = {"bottle.yaml": {}, "kolektor.yaml": {}, "elpv.yaml": {"rotation_probability": 0.0}}  # aligned cells


def test_cli_builds_the_recipe_on_the_users_dataset(tmp_path: Path) -> None:
    """The README's command line: the recipe's model and budget, the user's dataset instead of the config's."""
    cli = AnomalibCLI(
        args=[
            "train",
            "--config",
            str(ROOT / "configs" / "dsr_cpu.yaml"),
            "--data",
            "anomalib.data.MVTecAD",
            "--data.root",
            str(tmp_path / "MVTecAD"),
            "--data.category",
            "carpet",
            "--default_root_dir",
            str(tmp_path / "results"),
        ],
        run=False,
    )
    model, recipe = cli.model, RECIPE["model"]["init_args"]
    assert isinstance(model, Dsr)
    for name in ("learning_rate", "phase_ratio", "rotation_probability", "vq_weights"):
        assert getattr(model, name) == recipe[name], name
    shapes = {key: value.shape for key, value in Dsr(**recipe).state_dict().items()}
    assert {key: value.shape for key, value in model.state_dict().items()} == shapes  # the recipe's widths
    assert (ROOT / recipe["vq_weights"]).is_file()
    assert list(model.pre_processor.transform.transforms[0].size) == [recipe["image_size"]] * 2
    assert isinstance(cli.datamodule, MVTecAD) and cli.datamodule.category == "carpet"
    trainer = cli.config["train"]["trainer"]  # the Engine builds its Trainer when fitting starts
    assert trainer["max_steps"] == RECIPE["trainer"]["max_steps"] and trainer["accelerator"] == "cpu"
    (last,) = [c for c in cli.config_init["train"]["trainer"]["callbacks"] if getattr(c, "save_last", False)]
    assert 0 < last._every_n_train_steps <= trainer["max_steps"] // 4  # resumable without losing much


@pytest.mark.parametrize(("name", "overrides"), BENCHMARKS.items(), ids=list(BENCHMARKS))
def test_benchmark_configs_train_dsr_with_the_recipe(name: str, overrides: dict) -> None:
    config = yaml.safe_load((ROOT / "configs" / "benchmark" / name).read_text())
    (entry,) = [e for e in config["benchmark"]["model"]["grid"] if e["class_path"] == "anomalib_dsr.Dsr"]
    recipe = dict(RECIPE["model"]["init_args"])
    assert config["benchmark"]["image_size"] == recipe.pop("image_size")
    assert entry["init_args"] == {**recipe, **overrides}
    assert entry["trainer"]["max_steps"] == RECIPE["trainer"]["max_steps"]
