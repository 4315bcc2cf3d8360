"""Inference on an exported DSR: anomalib's ``OpenVINOInferencer`` on files, arrays and PIL images; grayscale and
RGBA handling (``anomalib_dsr.deploy.inference``); ``anomalib predict`` over a folder writing overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anomalib.cli import AnomalibCLI
from anomalib.deploy import OpenVINOInferencer
from PIL import Image

from anomalib_dsr.deploy.inference import DsrInferencer, openvino_config, to_rgb

from conftest import CATEGORY, IMAGE_SIZE
from deploy_support import deployed

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_root, tiny_widths):
    return deployed(tmp_path_factory, demo_root, tiny_widths)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """OpenVINOInferencer writes an ``openvino_cache`` folder into the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def defect_png(demo_root):
    return sorted((demo_root / CATEGORY / "test").glob("*/*.png"))[-1]


def lightning_prediction(exported, rgb: np.ndarray):
    with torch.no_grad():
        return exported["model"].eval()(torch.from_numpy(rgb).permute(2, 0, 1)[None].float())


def check_close(prediction, expected) -> None:
    # Another runtime's kernels (OpenVINO f32) against PyTorch's: the parity tolerances of the exports
    # (deploy_support.assert_parity). The deployed model's float32 rounding moves its map by ~4e-5 (against float64,
    # see deploy_support.deployed), 25x inside 1e-3, and no test image lies near a code tie, where a flipped code
    # would move the map by ~0.03.
    assert prediction.pred_score.shape == (1,) and prediction.anomaly_map.shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(prediction.pred_score, expected.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(prediction.anomaly_map, expected.anomaly_map.numpy(), atol=1e-3)
    assert bool(prediction.pred_label[0]) == bool(expected.pred_label[0])


def test_openvino_inferencer_on_png_jpg_array_and_pil(exported, defect_png, in_tmp):
    inferencer = OpenVINOInferencer(exported["openvino"], device="CPU", config=F32)
    rgb = np.asarray(Image.open(defect_png).convert("RGB"), dtype=np.float32) / 255.0
    expected = lightning_prediction(exported, rgb)
    check_close(inferencer.predict(defect_png), expected)  # PNG path
    check_close(inferencer.predict(str(defect_png)), expected)
    check_close(inferencer.predict(rgb), expected)  # float array (H, W, 3) in [0, 1]
    check_close(inferencer.predict(Image.open(defect_png)), expected)  # PIL

    jpg = in_tmp / "part.jpg"
    Image.open(defect_png).convert("RGB").save(jpg, quality=95)
    jpg_rgb = np.asarray(Image.open(jpg).convert("RGB"), dtype=np.float32) / 255.0
    check_close(inferencer.predict(jpg), lightning_prediction(exported, jpg_rgb))

    # larger image: the graph resizes it
    big = Image.open(defect_png).convert("RGB").resize((96, 128))
    big_rgb = np.asarray(big, dtype=np.float32) / 255.0
    check_close(inferencer.predict(big_rgb), lightning_prediction(exported, big_rgb))


def test_dsr_inferencer_converts_grayscale_and_rgba(exported, defect_png, in_tmp):
    inferencer = DsrInferencer(exported["openvino"])  # f32 by default
    assert inferencer.config == F32
    rgb_image = Image.open(defect_png).convert("RGB")
    gray = rgb_image.convert("L")
    gray_rgb = np.repeat(np.asarray(gray, dtype=np.float32)[..., None] / 255.0, 3, axis=-1)
    expected_gray = lightning_prediction(exported, gray_rgb)
    for image in (gray, np.asarray(gray), np.asarray(gray)[..., None], torch.from_numpy(np.asarray(gray))):
        check_close(inferencer.predict(image), expected_gray)
    gray.save(in_tmp / "gray.png")
    check_close(inferencer.predict(in_tmp / "gray.png"), expected_gray)

    rgba = rgb_image.copy()
    rgba.putalpha(128)
    expected = lightning_prediction(exported, np.asarray(rgb_image, dtype=np.float32) / 255.0)
    check_close(inferencer.predict(rgba), expected)
    check_close(inferencer.predict(np.asarray(rgba)), expected)  # uint8 (H, W, 4)
    check_close(inferencer.predict(np.asarray(rgb_image)), expected)  # uint8 (H, W, 3)
    check_close(inferencer.predict(np.asarray(rgb_image).transpose(2, 0, 1)), expected)  # channels first


def test_dsr_inferencer_warns_below_f32_only_for_a_model_without_the_f32_code_path(exported, in_tmp, monkeypatch):
    """The decision only: compiling is anomalib's (and at bf16 needs a CPU with bf16, see test_openvino_precision)."""
    import warnings

    from anomalib.models.components import AnomalibModule

    compiled = []
    monkeypatch.setattr(OpenVINOInferencer, "__init__", lambda self, path, device, config: compiled.append(config))
    plain = AnomalibModule.to_openvino(exported["model"], in_tmp / "plain", onnx_kwargs={"opset_version": 18})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DsrInferencer(exported["openvino"], precision=None)  # DSR's export keeps the code path in f32: no warning
        DsrInferencer(exported["openvino"], precision="bf16")
        DsrInferencer(exported["openvino"].with_suffix(".bin"), precision=None)  # anomalib accepts either file
        DsrInferencer(plain)  # f32: nothing to warn about
    with pytest.warns(UserWarning, match=r"does not keep DSR's code path in f32.*precision='f32'"):
        DsrInferencer(plain, precision=None)
    assert compiled == [{}, {"INFERENCE_PRECISION_HINT": "bf16"}, {}, F32, {}]


def test_to_rgb_refuses_what_it_cannot_convert_with_clear_messages(tmp_path):
    with pytest.raises(ValueError, match=r"got an array of shape \(2, 64, 64, 3\)"):
        to_rgb(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"got an array of shape \(64, 64, 5\)"):
        to_rgb(np.zeros((64, 64, 5), np.float32))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\].*255"):
        to_rgb(np.full((64, 64, 3), 200.0, np.float32))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_rgb(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="Cannot read an image"):
        to_rgb([[0.0]])
    with pytest.raises(ValueError, match="precision must be one of"):
        openvino_config("fp32")
    # a dark uint8 image stays dark (anomalib's heuristic divides by 255 only when max > 1)
    assert to_rgb(np.ones((64, 64, 3), np.uint8)).max() == pytest.approx(1 / 255)
    assert openvino_config(None) == {} and openvino_config("bf16") == {"INFERENCE_PRECISION_HINT": "bf16"}


def test_anomalib_predict_over_a_folder_writes_overlays(exported, demo_root, tiny_widths, tmp_path):
    images = demo_root / CATEGORY / "test" / "scratch"
    widths = [arg for name, value in tiny_widths.items() for arg in (f"--model.{name}", str(value))]
    AnomalibCLI(
        args=[
            "predict",
            "--model",
            "anomalib_dsr.Dsr",
            *widths,
            "--data",
            str(images),
            "--ckpt_path",
            str(exported["checkpoint"]),
            "--trainer.accelerator",
            "cpu",
            "--trainer.enable_progress_bar",
            "false",
            "--default_root_dir",
            str(tmp_path / "predict"),
        ]
    )
    overlays = sorted((tmp_path / "predict").rglob("*.png"))
    names = {path.name for path in overlays}
    assert {path.name for path in images.glob("*.png")} <= names, overlays
    for path in overlays:
        with Image.open(path) as overlay:
            assert overlay.mode == "RGB" and min(overlay.size) >= IMAGE_SIZE
