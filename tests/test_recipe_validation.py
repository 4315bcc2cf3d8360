"""``benchmarks/recipe_validation.py``: a recipe run on validation sets only, over seeds, at equal steps or equal
wall time, summarised as mean ± spread (tiny model, tiny demo-generator sets)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from conftest import IMAGE_SIZE

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def script():
    """The script as a module (its folder on ``sys.path`` for ``common``, as when run by path)."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("recipe_validation", BENCHMARKS / "recipe_validation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCHMARKS))


@pytest.fixture
def tiny_recipe(tmp_path: Path, vq_weights: Path, tiny_widths: dict[str, int]) -> Path:
    """configs/dsr_cpu.yaml at tiny widths, 64x64, batch 4 and 4 steps."""
    config = yaml.safe_load((BENCHMARKS.parent / "configs/dsr_cpu.yaml").read_text())
    config["model"]["init_args"].update(tiny_widths, image_size=IMAGE_SIZE, vq_weights=str(vq_weights))
    config["data"]["init_args"]["train_batch_size"] = 4
    config["trainer"]["max_steps"] = 4
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_runs_every_seed_on_every_validation_set_and_prints_mean_and_spread(script, tiny_recipe, tmp_path, capsys):
    args = ["--config", str(tiny_recipe), "--demo-seeds", "1", "2", "--seeds", "0", "1", "2", "--points", "2"]
    rows = script.main([*args, "--set", "learning_rate=0.001", "--output", str(tmp_path / "work"), "--curve"])
    printed = capsys.readouterr().out
    assert {(row["set"], row["seed"]) for row in rows} == {(f"demo seed {d}", s) for d in (1, 2) for s in (0, 1, 2)}
    assert sorted({row["step"] for row in rows}) == [2, 4]  # the config's 4 steps, 2 evaluations
    assert "'learning_rate': 0.001" in printed and "seeds [0, 1, 2]" in printed
    last = [row["image_AUROC"] for row in rows if row["set"] == "demo seed 1" and row["step"] == 4]
    mean, spread = statistics.fmean(last), statistics.stdev(last)
    assert "| demo seed 1 | 4 |" in printed and f"{mean:.3f} ± {spread:.3f}" in printed
    assert all(0.0 <= row["image_AUROC"] <= 1.0 and 0.0 <= row["pixel_AP"] <= 1.0 for row in rows)


def test_minutes_give_every_run_the_calibrated_steps(script, tiny_recipe, tmp_path, capsys):
    rows = script.main(
        ["--config", str(tiny_recipe), "--demo-seeds", "3", "--points", "1", "--minutes", "0.05",
         "--output", str(tmp_path / "work")]
    )  # fmt: skip
    printed = capsys.readouterr().out
    per_step, steps = float(printed.split(" s a step")[0].split()[-1]), rows[0]["step"]
    assert {row["step"] for row in rows} == {steps} and len(rows) == 3  # the default seeds 0, 1, 2
    assert f"{steps} steps in 0.05 minutes" in printed
    assert 3 / (per_step + 0.005) - 1 <= steps <= 3 / (per_step - 0.005) + 1  # 3 s over the printed (rounded) step


def test_refuses_test_sets_and_missing_validation_splits(script, tiny_recipe, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(["--config", str(tiny_recipe), "--demo-seeds", "0"])
    assert "0 is the demo's own dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--config", str(tiny_recipe), "--demo-seeds", "1", "--seeds", "0", "1"])
    assert "at least 3 different seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--config", str(tiny_recipe)])
    assert "give at least one validation set" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"kolektor_val is missing: run anomalib-dsr prepare-kolektor .*--val-share"):
        script.main(["--config", str(tiny_recipe), "--kolektor", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--set 'decoder_bottleneck': write NAME=VALUE"):
        script.main(["--config", str(tiny_recipe), "--demo-seeds", "1", "--set", "decoder_bottleneck"])
