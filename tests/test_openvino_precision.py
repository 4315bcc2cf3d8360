"""OpenVINO precision of an exported DSR: the code path (everything the four nearest-code searches depend on) is
written in operations the CPU plugin keeps as they are and marked f32, so the IR keeps fp32's codes at a CPU's
default bf16 precision; INT8 post-training quantisation leaves the code path unquantised.

Codes are compared exactly; scores and maps through the accuracy a user sees (image AUROC, pixel AP) of a small model
that finds the demo's defects: the tiny model's scores carry no signal yet (see ``deploy_support.deployed``).
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch
from anomalib.deploy import CompressionType
from anomalib.models.components import AnomalibModule

from anomalib_dsr.deploy.export import (
    F32_MARK_KEY,
    REWRITES,
    UNQUANTISED_TYPES,
    code_choices,
    code_path,
    keeps_code_path_in_f32,
    quantize,
    rewrite_code_path,
)

from conftest import CATEGORY, TRAINER_KWARGS
from deploy_support import ONNX_KWARGS, demo_test_images, demo_test_truth, deployed, detection_accuracy


def bf16_unavailable() -> str | None:
    """Why OpenVINO cannot compute in bf16 natively here, or None."""
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:
        return f"the CPU has no native bf16 (OpenVINO's CPU capabilities: {', '.join(capabilities)})"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if not any(isa in cap for isa in ("ALL", "BF16", "AMX", "FP16", "AVX10")):
        return f"ONEDNN_MAX_CPU_ISA={cap} caps OpenVINO's oneDNN below its bf16 kernels"
    return None


BF16_UNAVAILABLE = bf16_unavailable()


def int8_without_vnni() -> str | None:
    """Why OpenVINO's INT8 convolutions run without VNNI or AMX here (their u8 x s8 pair sums then saturate in int16,
    which costs accuracy), or None."""
    flags: set[str] = set()
    with suppress(OSError, StopIteration):
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        flags = set(line.split(":", 1)[1].split())
    if not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "the CPU has no VNNI or AMX int8 instructions"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if not any(isa in cap for isa in ("ALL", "VNNI", "BF16", "AMX", "FP16", "AVX10")):
        return f"ONEDNN_MAX_CPU_ISA={cap} caps OpenVINO's oneDNN below its VNNI kernels"
    return None


INT8_WITHOUT_VNNI = int8_without_vnni()
# INT8 at f32 within 1 point of image AUROC and 2 of pixel AP, docs/deployment.md's promise, where the CPU has VNNI or
# AMX. Without them (AVX2 kernels) docs/deployment.md says INT8 loses more: seen -3.8 / -0.4 points on this test's
# fixture and -0.4 / -3.3 on the demo model; the bound then only guards against a broken quantisation (chance: -30).
INT8_POINTS = (0.01, 0.02) if INT8_WITHOUT_VNNI is None else (0.06, 0.05)

# The accuracy tests' test set. One swapped good/defective pair moves image AUROC by 1 / (good x defective): with
# 100 x 100 images the promised point is 100 pairs, so kernel differences between CPUs (VNNI or AMX INT8, a few
# pairs on the demo's 16 x 24 images) cannot decide the test; the demo's own 40 images would make a point 4 pairs.
TEST_GOOD, TEST_DEFECTIVE = 100, 100
CHUNK = 25  # images per inference call: the 200 images at once would hold several GB of activations


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_root, tiny_widths):
    return deployed(tmp_path_factory, demo_root, tiny_widths)


@pytest.fixture(scope="module")
def int8_ir(exported, demo_root, tmp_path_factory):
    """The tiny model's INT8 PTQ IR, exported as ``anomalib export --compression_type INT8_PTQ`` does."""
    from anomalib.data import MVTecAD

    datamodule = MVTecAD(root=demo_root, category=CATEGORY, train_batch_size=4, eval_batch_size=4, num_workers=0)
    return exported["engine"].export(
        exported["model"], "openvino", export_root=tmp_path_factory.mktemp("int8"),
        compression_type=CompressionType.INT8_PTQ, datamodule=datamodule, onnx_kwargs=dict(ONNX_KWARGS),
    )  # fmt: skip


def codes_at(xml, images: torch.Tensor, precision: str) -> tuple[dict[str, np.ndarray], list[np.ndarray], set[str]]:
    """Outputs and the four codes of ``xml`` compiled at ``precision``, and the precisions the CPU plugin runs the
    code path's operations at."""
    model = ov.Core().read_model(xml)
    path = {node.get_friendly_name() for node in code_path(model)}
    searches = code_choices(model)
    model.add_outputs([node.output(1) for node in searches])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    results = [compiled(chunk.numpy()) for chunk in images.split(CHUNK)]
    named, codes = compiled.outputs[: -len(searches)], compiled.outputs[-len(searches) :]
    runtime = set()
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        if path & set(info["originalLayersNames"].astype(str).split(",")) and info["layerType"].astype(str) != "Input":
            runtime.add(info["runtimePrecision"].astype(str))
    joined = {output: np.concatenate([result[output] for result in results]) for output in compiled.outputs}
    return {output.any_name: joined[output] for output in named}, [joined[output] for output in codes], runtime


def test_code_path_is_marked_f32_in_forms_the_plugin_keeps(exported):
    model = ov.Core().read_model(exported["openvino"])
    path = code_path(model)
    types = {node.get_type_name() for node in path}
    assert {"Parameter", "Convolution", "MVN", "MaxPool", "Interpolate", "TopK"} <= types, types
    # the four searches, and nothing that only the decoders and U-Nets compute (their Softmax, AvgPool)
    assert sum(node.get_type_name() == "TopK" for node in path) == 4
    assert not types & {"Softmax", "AvgPool"}, types
    assert len(path) < len(model.get_ordered_ops()) / 2
    # no operation the CPU plugin replaces (dropping the mark): MatMul, element-wise Subtract, newer versions
    assert not types & {"MatMul", "Subtract"}, types
    versions = {(node.get_type_name(), node.get_type_info().version_id) for node in path}
    assert {("Interpolate", "opset4"), ("MaxPool", "opset1")} <= versions and not {
        ("Interpolate", "opset11"),
        ("MaxPool", "opset8"),
    } & versions, versions
    assert keeps_code_path_in_f32(model)
    marked = {node.get_friendly_name() for node in model.get_ordered_ops() if F32_MARK_KEY in node.get_rt_info()}
    assert marked <= {node.get_friendly_name() for node in path}  # decoders and U-Nets: the device's precision


def test_every_rewrite_matches_an_op_the_model_emits(exported, tmp_path):
    """The export contract: each op pattern of ``REWRITES`` is emitted by the model (anomalib's plain export, before
    the rewrite, matches every one; four nearest-code searches), and none of the kinds they replace is left on the
    code path. A change of an emitting op (``vq_vae.py``, ``layers/norm.py``, ``layers/sampling.py``) fails here."""
    plain = AnomalibModule.to_openvino(exported["model"], tmp_path, onnx_kwargs=dict(ONNX_KWARGS))
    model = ov.Core().read_model(plain)
    matched = rewrite_code_path(model)
    assert set(matched) == set(REWRITES), matched
    assert matched["nearest code"] == 4
    left = {(node.get_type_name(), node.get_type_info().version_id) for node in code_path(model)}
    assert not {kind for kind, _ in left} & {"MatMul", "Subtract"}, left
    assert not left & {("Interpolate", "opset11"), ("MaxPool", "opset8")}, left


def test_code_choices_refuses_a_graph_that_is_not_dsr():
    import openvino.opset13 as ops

    parameter = ops.parameter([1, 3, 8, 8], np.float32)
    model = ov.Model([ops.relu(parameter)], [parameter])
    with pytest.raises(ValueError, match="found 0"):
        code_choices(model)


def test_int8_ptq_leaves_the_code_path_unquantised_and_keeps_fp32_codes(exported, int8_ir, demo_root):
    """``Dsr._post_training_quantization_ov`` (the ``INT8_PTQ`` hook of ``to_openvino``): no FakeQuantize in the
    code path nor in front of a transposed convolution; at f32 the codes are the FP32 IR's, which match PyTorch
    (``test_export``)."""
    model = ov.Core().read_model(int8_ir)
    quantisers = [node for node in model.get_ordered_ops() if node.get_type_name() == "FakeQuantize"]
    assert quantisers, "NNCF quantised nothing"
    on_path = {node.get_friendly_name() for node in code_path(model)}
    assert not [node.get_friendly_name() for node in quantisers if node.get_friendly_name() in on_path]
    consumers = {port.get_node().get_type_name() for node in quantisers for port in node.output(0).get_target_inputs()}
    assert not consumers & set(UNQUANTISED_TYPES), consumers

    _, images = demo_test_images(demo_root)
    _, expected, _ = codes_at(exported["openvino"], images, "f32")
    outputs, codes, _ = codes_at(int8_ir, images, "f32")
    # Exact: the code path is left unquantised, the same f32 operations in both IRs, compiled alike on one CPU.
    for got, want in zip(codes, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.isfinite(outputs["anomaly_map"]).all() and np.isfinite(outputs["pred_score"]).all()


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> dict[str, object]:
    """A small model that finds the demo's defects: the demo's recipe (the shipped general VQ-VAE, quarter widths,
    128x128) for 120 steps, exported as FP32 and INT8 PTQ IRs, and tested on a larger test set than the demo's
    (``TEST_GOOD`` good, ``TEST_DEFECTIVE`` defective images: one point of image AUROC is 100 swapped pairs)."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_dsr import Dsr
    from anomalib_dsr.data.demo_data import make_demo_dataset
    from anomalib_dsr.data.general_images import GENERAL_VQ_FILE
    from anomalib_dsr.workflows.demo import DemoSettings

    root = tmp_path_factory.mktemp("detector")
    settings = DemoSettings()
    make_demo_dataset(
        root,
        image_size=settings.image_size,
        num_train=settings.num_train,
        seed=settings.seed,
        num_test_good=TEST_GOOD,
        num_test_defect=TEST_DEFECTIVE // 2,
    )  # the demo's training images
    seed_everything(settings.seed, workers=True)
    model = Dsr(vq_weights=GENERAL_VQ_FILE, **settings.dsr_kwargs)
    datamodule = MVTecAD(root=root, category=CATEGORY, train_batch_size=8, eval_batch_size=8, num_workers=0)
    engine = Engine(default_root_dir=root / "results", max_steps=120, logger=False, **TRAINER_KWARGS)
    engine.fit(model, datamodule=datamodule)
    model.eval()
    _, images = demo_test_images(root)
    labels, masks = demo_test_truth(root)
    with torch.no_grad():
        expected = [model(chunk) for chunk in images.split(CHUNK)]
    exports = {
        name: engine.export(model, "openvino", export_root=root / name, compression_type=compression,
                            datamodule=datamodule, onnx_kwargs=dict(ONNX_KWARGS))
        for name, compression in (("fp32", None), ("int8", CompressionType.INT8_PTQ))
    }  # fmt: skip
    scores, maps = (torch.cat([getattr(batch, name) for batch in expected]) for name in ("pred_score", "anomaly_map"))
    accuracy = detection_accuracy(scores, maps, labels, masks)
    return {"model": model, "images": images, "labels": labels, "masks": masks, "accuracy": accuracy, **exports}


def assert_keeps_accuracy(detector, outputs: dict[str, np.ndarray], points: tuple[float, float], label: str) -> None:
    """Image AUROC and pixel AP of ``outputs`` at most ``points`` below PyTorch's. On the ``TEST_GOOD`` x
    ``TEST_DEFECTIVE`` test images a point of image AUROC is 100 swapped good/defective pairs."""
    got = detection_accuracy(outputs["pred_score"], outputs["anomaly_map"], detector["labels"], detector["masks"])
    pairs = (detector["accuracy"][0] - got[0]) * TEST_GOOD * TEST_DEFECTIVE
    print(f"{label}: image AUROC / pixel AP {got[0]:.4f} / {got[1]:.4f} ({pairs:.0f} pairs lost), PyTorch "
          f"{detector['accuracy'][0]:.4f} / {detector['accuracy'][1]:.4f}")  # fmt: skip
    assert got[0] >= detector["accuracy"][0] - points[0] and got[1] >= detector["accuracy"][1] - points[1], (label, got)


@pytest.mark.slow
def test_int8_ptq_keeps_the_accuracy_at_f32(detector):
    """INT8 PTQ within 1 point of image AUROC (100 swapped pairs) and 2 of pixel AP at f32, the precision of CPUs
    without bf16: what docs/deployment.md promises (seen on this fixture: +0.1 / -0.1 points with AMX and with
    VNNI kernels). On CPUs without VNNI, ``INT8_POINTS``' wider bound (reason printed with ``-s``)."""
    outputs, _, _ = codes_at(detector["int8"], detector["images"], "f32")
    if INT8_WITHOUT_VNNI is not None:
        print(f"INT8 within {INT8_POINTS} here: {INT8_WITHOUT_VNNI}")
    assert_keeps_accuracy(detector, outputs, INT8_POINTS, "INT8 PTQ IR at f32")


@pytest.mark.slow
@pytest.mark.skipif(BF16_UNAVAILABLE is not None, reason=f"bf16 inference: {BF16_UNAVAILABLE}")
def test_bf16_inference_keeps_fp32_codes_and_accuracy(detector, tmp_path):
    """At ``INFERENCE_PRECISION_HINT=bf16`` (the default on CPUs with AMX or AVX512-BF16) the FP32 and INT8 IRs run
    the code path in f32 and choose fp32's codes; image AUROC and pixel AP stay within 0.5 points (50 swapped pairs)
    of PyTorch's. INT8 at bf16: within 2 points (200 pairs) of image AUROC and 2 of pixel AP. Its float parts then
    run in bf16 (3 significant digits) on top of INT8's rounding, and this briefly trained fixture's scores lie close
    together (image AUROC about 0.82): seen -0.9 points with AMX and -0.8 with VNNI kernels; the demo model keeps
    the promised point there (docs/deployment.md). anomalib's own export, without the rewrite, changes codes."""
    images = detector["images"]
    _, fp32_codes, _ = codes_at(detector["fp32"], images, "f32")
    for name, points in (("fp32", (0.005, 0.005)), ("int8", (0.02, 0.02))):
        outputs, codes, runtime = codes_at(detector[name], images, "bf16")
        assert "f32" in runtime and not runtime & {"bf16", "f16"}, (name, runtime)
        # Exact: the marked code path is the same f32 subgraph at either precision hint (the same plugin kernels on
        # the same inputs); a changed code means part of the path ran in bf16, which this test exists to catch.
        for got, want in zip(codes, fp32_codes, strict=True):
            np.testing.assert_array_equal(got, want)
        assert_keeps_accuracy(detector, outputs, points, f"{name} IR at bf16")

    plain = AnomalibModule.to_openvino(detector["model"], tmp_path, onnx_kwargs=dict(ONNX_KWARGS))
    _, codes, runtime = codes_at(plain, images, "bf16")
    assert "bf16" in runtime  # the plain export runs (part of) the code path in bf16
    assert any((got.reshape(-1) != want.reshape(-1)).any() for got, want in zip(codes, fp32_codes, strict=True))


def test_quantize_needs_training_images(exported):
    with pytest.raises(ValueError, match="needs a datamodule"):
        quantize(ov.Core().read_model(exported["openvino"]), None)
