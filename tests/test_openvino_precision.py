"""OpenVINO precision of an exported DSR: INT8 post-training quantisation leaves the code path (everything the four
nearest-code searches depend on) unquantised and keeps fp32's codes.

Parity is measured on the codes, not on scores: the tiny model's scores and maps are ill-conditioned (see
``deploy_support.deployed``), while a code is either the fp32 one or not.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest
import torch

from deploy_support import demo_test_images, deployed, openvino_with_codes
from anomalib_dsr import Dsr
from anomalib_dsr.export import UNQUANTISED_TYPES, code_choices, code_path, quantize


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_root, tiny_widths):
    return deployed(tmp_path_factory, demo_root, tiny_widths)


def codes_at(xml, images: torch.Tensor, precision: str) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Outputs and the four codes of ``xml`` compiled at ``precision``."""
    model = ov.Core().read_model(xml)
    searches = code_choices(model)
    model.add_outputs([node.output(1) for node in searches])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    result = compiled(images.numpy())
    named, codes = compiled.outputs[: -len(searches)], compiled.outputs[-len(searches) :]
    return {output.any_name: result[output] for output in named}, [result[output] for output in codes]


def test_code_path_is_the_vq_encoders_and_restriction_not_the_decoders(exported):
    model = ov.Core().read_model(exported["openvino"])
    path = code_path(model)
    types = {node.get_type_name() for node in path}
    assert {"Parameter", "Convolution", "MVN", "MaxPool", "MatMul", "TopK"} <= types, types
    # the four searches, and nothing that only the decoders and U-Nets compute (their Softmax, AvgPool)
    assert sum(node.get_type_name() == "TopK" for node in path) == 4
    assert not types & {"Softmax", "AvgPool"}, types
    assert len(path) < len(model.get_ordered_ops()) / 2


def test_code_choices_refuses_a_graph_that_is_not_dsr():
    import openvino.opset13 as ops

    parameter = ops.parameter([1, 3, 8, 8], np.float32)
    model = ov.Model([ops.relu(parameter)], [parameter])
    with pytest.raises(ValueError, match="found 0"):
        code_choices(model)


def test_int8_ptq_leaves_the_code_path_unquantised_and_keeps_fp32_codes(exported, demo_root, make_datamodule, tmp_path):
    """``Dsr._post_training_quantization_ov`` (the ``INT8_PTQ`` hook of ``to_openvino``) on the FP32 IR: no
    FakeQuantize in the code path nor in front of a transposed convolution; at f32 precision (DSR's deployment
    setting) the codes are the FP32 IR's, which match PyTorch (``test_export``)."""
    fp32 = exported["openvino"]
    int8 = Dsr._post_training_quantization_ov(ov.Core().read_model(fp32), make_datamodule())  # noqa: SLF001
    xml = tmp_path / "int8.xml"
    ov.save_model(int8, xml, compress_to_fp16=False)
    model = ov.Core().read_model(xml)
    quantisers = [node for node in model.get_ordered_ops() if node.get_type_name() == "FakeQuantize"]
    assert quantisers, "NNCF quantised nothing"
    on_path = {node.get_friendly_name() for node in code_path(model)}
    assert not [node.get_friendly_name() for node in quantisers if node.get_friendly_name() in on_path]
    consumers = {port.get_node().get_type_name() for node in quantisers for port in node.output(0).get_target_inputs()}
    assert not consumers & set(UNQUANTISED_TYPES), consumers

    _, images = demo_test_images(demo_root)
    _, expected = openvino_with_codes(fp32)(images)
    outputs, codes = codes_at(xml, images, "f32")
    for got, want in zip(codes, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.isfinite(outputs["anomaly_map"]).all() and np.isfinite(outputs["pred_score"]).all()


def test_quantize_needs_training_images(exported):
    with pytest.raises(ValueError, match="needs a datamodule"):
        quantize(ov.Core().read_model(exported["openvino"]), None)
