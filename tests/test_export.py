"""Export of DSR (OpenVINO, ONNX, torch; FP16, INT8) through ``Engine.export`` and ``anomalib export``, and
parity of the exported graphs with the Lightning model in eval mode.

The exported graph takes RGB images ``(B, 3, H, W)`` in [0, 1] of any size and batch: resize, channel
flip, DSR, anomalib's normalisation and thresholds are inside it.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest
import torch
import torch.nn.functional as F
from anomalib.cli import AnomalibCLI
from anomalib.deploy import CompressionType

from anomalib_dsr.deploy.export import code_path

from conftest import IMAGE_SIZE
from deploy_support import ONNX_KWARGS, assert_parity, compare, demo_test_images, deployed

OUTPUTS = ("pred_score", "pred_label", "anomaly_map", "pred_mask")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_root, tiny_widths):
    return deployed(tmp_path_factory, demo_root, tiny_widths)


def inputs(demo_root) -> dict[str, torch.Tensor]:
    """Test batches: the demo images at their size, the same at 96x80 (the graph resizes), batch of 1."""
    _, images = demo_test_images(demo_root)
    return {
        "64x64": images,
        "96x80": F.interpolate(images, size=(96, 80), mode="bilinear", antialias=True).clamp(0, 1),
        "batch1": images[5:6],
    }


def reference(model, images: torch.Tensor):
    with torch.no_grad():
        return model.eval()(images)


def run_openvino(path, images: torch.Tensor, config: dict | None = None) -> dict[str, np.ndarray]:
    compiled = ov.Core().compile_model(ov.Core().read_model(path), "CPU", config or {})
    result = compiled(images.numpy())
    return {output.any_name: result[output] for output in compiled.outputs}


def cli_export(exported, export_type: str, tmp_path) -> AnomalibCLI:
    """``anomalib export --model anomalib_dsr.Dsr --ckpt_path ...``: no model arguments, the checkpoint has them."""
    return AnomalibCLI(
        args=[
            "export",
            "--model",
            "anomalib_dsr.Dsr",
            "--ckpt_path",
            str(exported["checkpoint"]),
            "--export_type",
            export_type,
            "--export_root",
            str(tmp_path / export_type),
            "--onnx_kwargs",
            '{"opset_version": 18}',
            "--trainer.accelerator",
            "cpu",
            "--default_root_dir",
            str(tmp_path / "cli"),
        ]
    )


def test_openvino_graph_has_dynamic_batch_and_size_and_all_outputs(exported):
    model = ov.Core().read_model(exported["openvino"])
    (model_input,) = model.inputs
    shape = model_input.get_partial_shape()
    assert shape[1].get_length() == 3
    assert shape[0].is_dynamic and shape[2].is_dynamic and shape[3].is_dynamic
    assert {output.any_name for output in model.outputs} == set(OUTPUTS)


def test_openvino_fp32_matches_lightning_model(exported, demo_root):
    """OpenVINO IR from ``Engine.export``, compiled with f32 inference precision (not bf16 on AMX CPUs)."""
    model = exported["model"]
    for name, images in inputs(demo_root).items():
        outputs = run_openvino(exported["openvino"], images, {"INFERENCE_PRECISION_HINT": "f32"})
        figures = compare(reference(model, images), outputs)
        assert_parity(figures, name)
        assert outputs["anomaly_map"].shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
    # the calibration splits labels: parity on labels is not trivially all-False
    labels = reference(model, inputs(demo_root)["64x64"]).pred_label
    assert 0 < int(labels.sum()) < len(labels)


def test_cli_export_onnx_matches_in_onnxruntime_and_openvino(exported, demo_root, tmp_path):
    """``anomalib export --export_type onnx`` from the checkpoint; ONNX Runtime and OpenVINO reading the .onnx."""
    import onnxruntime

    cli_export(exported, "onnx", tmp_path)
    (onnx_file,) = (tmp_path / "onnx").rglob("model.onnx")
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    assert set(names) == set(OUTPUTS)
    model = exported["model"]
    for name, images in inputs(demo_root).items():
        expected = reference(model, images)
        outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
        assert_parity(compare(expected, outputs), name)
        outputs = run_openvino(onnx_file, images, {"INFERENCE_PRECISION_HINT": "f32"})
        assert_parity(compare(expected, outputs), name)


def test_cli_export_torch(exported, demo_root, tmp_path, force_algorithms):
    force_algorithms()  # the same algorithms in both models (timed choices are shared in a process anyway)
    cli_export(exported, "torch", tmp_path)
    (pt_file,) = (tmp_path / "torch").rglob("model.pt")
    loaded = torch.load(pt_file, map_location="cpu", weights_only=False)["model"].eval()
    images = inputs(demo_root)["96x80"]
    figures = compare(
        reference(exported["model"], images),
        {k: v.numpy() for k, v in reference(loaded, images)._asdict().items() if v is not None},
    )
    assert set(figures.values()) == {0.0}, figures  # exact by construction: a copy, the same kernels, same batch


@pytest.mark.slow
def test_fp16_and_int8_ptq_exports(exported, demo_root, make_datamodule, tmp_path):
    """``compression_type`` FP16 (weights stored in f16) and INT8_PTQ (NNCF, calibrated on the datamodule's training
    images, the code path unquantised)."""
    engine, model = exported["engine"], exported["model"]
    images = inputs(demo_root)["64x64"]
    expected = reference(model, images)
    fp16 = engine.export(
        model,
        "openvino",
        export_root=tmp_path / "fp16",
        compression_type=CompressionType.FP16,
        onnx_kwargs=dict(ONNX_KWARGS),
    )
    fp16_figures = compare(expected, run_openvino(fp16, images, {"INFERENCE_PRECISION_HINT": "f32"}))
    # f16 weights: close, not equal (this barely trained model amplifies rounding in its InstanceNorms)
    assert fp16_figures["pred_score"] < 1e-2 and fp16_figures["anomaly_map_mean"] < 5e-2, fp16_figures
    # the code path's weights stay f32 (anomalib_dsr.deploy.export.keep_code_path_in_f32), the others are stored in f16
    compressed = ov.Core().read_model(fp16)
    on_path = {op.get_friendly_name() for op in code_path(compressed)}
    weights = [
        op for op in compressed.get_ops() if op.get_type_name() == "Constant" and op.get_element_type().is_real()
    ]
    assert {str(op.get_element_type()) for op in weights if op.get_friendly_name() in on_path} == {"<Type: 'float32'>"}
    assert "<Type: 'float16'>" in {
        str(op.get_element_type()) for op in weights if op.get_friendly_name() not in on_path
    }
    assert fp16.with_suffix(".bin").stat().st_size < exported["openvino"].with_suffix(".bin").stat().st_size

    int8 = engine.export(
        model,
        "openvino",
        export_root=tmp_path / "int8",
        compression_type=CompressionType.INT8_PTQ,
        datamodule=make_datamodule(),
        onnx_kwargs=dict(ONNX_KWARGS),
    )
    # f32 inference precision: DSR's deployment setting (anomalib_dsr.deploy.export), and what an AVX2-only CPU runs by
    # default (under ONEDNN_MAX_CPU_ISA=AVX2 OpenVINO still defaults to bf16, which has no AVX2 deconvolution)
    outputs = run_openvino(int8, images, {"INFERENCE_PRECISION_HINT": "f32"})
    quantised = ov.Core().read_model(int8)
    assert any(op.get_type_name() == "FakeQuantize" for op in quantised.get_ops())
    on_code_path = {op.get_friendly_name() for op in code_path(quantised)}
    quantisers = [op.get_friendly_name() for op in quantised.get_ops() if op.get_type_name() == "FakeQuantize"]
    assert not on_code_path.intersection(quantisers)
    for key in OUTPUTS:
        assert outputs[key].shape == tuple(getattr(expected, key).shape), key
    assert np.isfinite(outputs["anomaly_map"]).all() and np.isfinite(outputs["pred_score"]).all()
