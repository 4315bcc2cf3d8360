"""OpenVINO export of DSR: the code path kept in f32 at any inference precision, and INT8 post-training
quantisation that leaves it unquantised.

DSR picks codes four times (nearest entries of K_lo and K_hi for the input, then again for the restricted
features; ONNX's ArgMin, OpenVINO's TopK). A feature lying close to the midpoint of two codes flips to the
other code under a small change, and a flipped code changes the reconstructions the anomaly map is made of.
Everything those four choices depend on (the VQ encoders, the restriction modules, the distance computations:
the "code path") therefore stays unquantised; NNCF quantises the decoders and the two U-Nets, most of the
work. NNCF calibrates on the datamodule's normal training images: anomalib's default uses
``val_dataloader()``, which for MVTec-style data is the test split with its defects.

The exported IR runs the code path in f32 at any inference precision (``keep_code_path_in_f32``), so it keeps
FP32's codes at bf16, the CPU plugin's default on CPUs with AMX or AVX512-BF16, while the rest runs in bf16.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING
from xml.etree import ElementTree

import numpy as np
import openvino as ov
import openvino.opset1 as ops1
import openvino.opset13 as ops
from openvino.utils.node_factory import NodeFactory

if TYPE_CHECKING:
    from anomalib.data import AnomalibDataModule

logger = logging.getLogger(__name__)

CODE_CHOICE_TYPE = "TopK"  # ONNX ArgMin after conversion to OpenVINO
NUM_CODE_CHOICES = 4
# Transposed convolutions stay in floating point: an INT8 IR with quantised ones failed to compile under
# ONEDNN_MAX_CPU_ISA=AVX2 ("could not create a primitive descriptor for the deconvolution forward propagation
# primitive", issue #24).
UNQUANTISED_TYPES = ("ConvolutionBackpropData",)
# Operations that carry no computation of their own: left out of NNCF's ignored scope (it matches names
# against the operations it may quantise or annotate).
_NOT_OPERATIONS = {"Constant", "Parameter", "Result"}


def code_choices(model: ov.Model) -> list[ov.Node]:
    """The four nearest-code searches of an exported DSR graph, in graph order."""
    nodes = [node for node in model.get_ordered_ops() if node.get_type_name() == CODE_CHOICE_TYPE]
    if len(nodes) != NUM_CODE_CHOICES:
        names = [node.get_friendly_name() for node in nodes]
        msg = (
            f"Expected the {NUM_CODE_CHOICES} nearest-code searches ({CODE_CHOICE_TYPE}) of an exported DSR "
            f"graph, found {len(nodes)}: {names}. Is this model an export of anomalib_dsr.Dsr?"
        )
        raise ValueError(msg)
    return nodes


def code_path(model: ov.Model) -> list[ov.Node]:
    """Every node the four code choices depend on, the choices included, in graph order."""
    seen: set[str] = set()
    stack = code_choices(model)
    while stack:
        node = stack.pop()
        if (name := node.get_friendly_name()) in seen:
            continue
        seen.add(name)
        stack.extend(port.get_source_output().get_node() for port in node.inputs())
    return [node for node in model.get_ordered_ops() if node.get_friendly_name() in seen]


def quantize(model: ov.Model, datamodule: AnomalibDataModule | None) -> ov.Model:
    """NNCF post-training INT8 quantisation of an exported DSR ``model``, calibrated on the normal training
    images of ``datamodule``; the code path and transposed convolutions stay in floating point."""
    import nncf

    if datamodule is None:
        msg = "INT8_PTQ export of DSR needs a datamodule: NNCF calibrates on its normal training images."
        raise ValueError(msg)
    datamodule.setup("fit")
    dataloader = datamodule.train_dataloader()
    if len(dataloader.dataset) == 0:
        msg = "INT8_PTQ export of DSR: the datamodule's training set is empty; NNCF needs images to calibrate on."
        raise ValueError(msg)
    kept = [node.get_friendly_name() for node in code_path(model) if node.get_type_name() not in _NOT_OPERATIONS]
    logger.info("INT8 PTQ: %d code-path operations and all %s stay unquantised", len(kept), "/".join(UNQUANTISED_TYPES))
    return nncf.quantize(
        model,
        nncf.Dataset(dataloader, lambda batch: batch.image.numpy()),
        subset_size=len(dataloader),
        ignored_scope=nncf.IgnoredScope(names=kept, types=list(UNQUANTISED_TYPES)),
    )


# OpenVINO's CPU plugin leaves an operation at f32 under bf16 (or f16) inference precision when the IR marks it
# with this runtime attribute (value: from any type, not to f16). The mark does not survive the plugin's own
# rewrites (Interpolate-11 into -4, MaxPool-8 into -1, MatMul into FullyConnected, element-wise chains into
# fused subgraphs), so ``keep_code_path_in_f32`` first writes the code path in forms the plugin keeps as they are.
F32_MARK = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16"}
F32_MARK_KEY = f"{F32_MARK['name']}_{F32_MARK['version']}"  # the attribute's rt_info key in OpenVINO's Python API


def _source(node: ov.Node, port: int) -> ov.Node:
    return node.input(port).get_source_output().get_node()


def _input(node: ov.Node | None, kind: str) -> ov.Node | None:
    """The first operation of type ``kind`` that feeds ``node``, or None."""
    sources = () if node is None else (port.get_source_output().get_node() for port in node.inputs())
    return next((source for source in sources if source.get_type_name() == kind), None)


def _constant_input(node: ov.Node | None) -> np.ndarray | None:
    """The value of the first Constant that feeds ``node``, or None."""
    constant = _input(node, "Constant")
    return None if constant is None else constant.get_data()


def _older_interpolate(node: ov.Node) -> ov.Node:
    """Interpolate-11 as the Interpolate-4 the plugin would turn it into (v4 takes sizes and scales)."""
    attributes = node.get_attributes()
    given = node.input(1).get_source_output()
    count = given.get_partial_shape()[0].get_length()
    by_sizes = attributes["shape_calculation_mode"] == "sizes"
    unused = ops.constant(np.ones(count, np.float32 if by_sizes else np.int64)).output(0)
    sizes, scales = (given, unused) if by_sizes else (unused, given)
    axes = [node.input(2).get_source_output()] if node.get_input_size() > 2 else []
    image = node.input(0).get_source_output()
    return NodeFactory("opset4").create("Interpolate", [image, sizes, scales, *axes], attributes)


# The rewrites of the code path, by the op pattern of the exported graph each one matches. Each pattern is emitted
# by one place of the model, which names its rewrite here; a test fails if an export no longer matches one of them.
REWRITES = {
    "nearest code": "TopK over torch.addmm(|z|² + |e|², z, Eᵀ) (model/vq_vae.py, EMACodebook.squared_distances)",
    "centred normalisation": "x - ReduceMean(x) (model/layers/norm.py, InstanceNorm2d under graph capture)",
    "straight-through": "z + (q - z) (model/vq_vae.py, EMACodebook.quantize)",
    "Interpolate-11": "torch's bilinear upsampling (the restriction modules' nn.Upsample)",
    "MaxPool-8": "torch's max-pooling (the restriction modules' MaxPool2x2 under graph capture)",
}


def rewrite_code_path(model: ov.Model) -> Counter[str]:
    """Rewrite the code path of ``model`` in place, in operations whose f32 mark the CPU plugin keeps; returns how
    often each of :data:`REWRITES` matched."""
    matched: Counter[str] = Counter()
    for node in code_path(model):
        if node.get_type_name() == "TopK":
            if _source(_source(node, 0), 0).get_type_name() != "Convolution":  # not rewritten yet
                node.output(1).replace(_nearest_codes(node))
                matched["nearest code"] += 1
        elif (replacement := _replacement(node)) is not None:
            name, output = replacement
            node.output(0).replace(output)
            matched[name] += 1
    model.validate_nodes_and_infer_types()
    return matched


def _replacement(node: ov.Node) -> tuple[str, ov.Output] | None:
    """The rewrite that matches ``node`` and ``node``'s output computed by operations the CPU plugin keeps as they
    are, or None where it keeps ``node``:

    - Interpolate-11 → Interpolate-4 and MaxPool-8 (indices unused) → MaxPool-1, the same computations;
    - ``x - ReduceMean(x)`` (the centred InstanceNorm) → MVN without variance normalisation;
    - the straight-through ``z + (q - z)`` → ``q`` (equal up to one rounding; no gradient flows in an IR).
    """
    kind, version = node.get_type_name(), node.get_type_info().version_id
    inputs = [port.get_source_output() for port in node.inputs()]
    if kind == "Interpolate" and version == "opset11":
        return "Interpolate-11", _older_interpolate(node).output(0)
    if kind == "MaxPool" and version == "opset8" and not node.output(1).get_target_inputs():
        a = node.get_attributes()
        if all(dilation == 1 for dilation in a["dilations"]):
            pool = ops1.max_pool(
                inputs[0], a["strides"], a["pads_begin"], a["pads_end"], a["kernel"], a["rounding_type"], a["auto_pad"]
            )
            return "MaxPool-8", pool.output(0)
    if kind == "Subtract" and (mean := inputs[1].get_node()).get_type_name() == "ReduceMean":
        if mean.input(0).get_source_output() == inputs[0]:
            mvn = ops.mvn(inputs[0], mean.input(1).get_source_output(), False, 0.0, "inside_sqrt")
            return "centred normalisation", mvn.output(0)
    if kind == "Add" and (difference := inputs[1].get_node()).get_type_name() == "Subtract":
        if difference.input(1).get_source_output() == inputs[0]:
            return "straight-through", difference.input(0).get_source_output()
    return None


def _nearest_codes(search: ov.Node) -> ov.Output:
    """The indices ``(rows, 1)`` of a nearest-code search, TopK (k=1) over torch's ``addmm``
    ``|flat|² + |e|² + m * flat @ Eᵀ`` with ``flat = z.permute(0, 2, 3, 1).reshape(-1, C)``, computed by a 1×1
    convolution of ``z`` with weights ``m * E`` and bias ``|e|²`` (on ``z`` itself: the plugin merges reshapes
    into unmarked ones)."""
    distances = _source(search, 0)
    product = _input(_input(distances, "Multiply"), "MatMul")
    channels_last = _input(_input(product, "Reshape"), "Transpose")
    order, factor = _constant_input(channels_last), _constant_input(_input(distances, "Multiply"))
    codes, code_norms = _constant_input(product), _constant_input(_input(distances, "Add"))
    if any(part is None for part in (order, factor, codes, code_norms)) or list(order) != [0, 2, 3, 1]:
        msg = (
            f"Unexpected nearest-code search at {search.get_friendly_name()}: not the argmin of "
            "torch.addmm(|z|² + |e|², z.permute(0, 2, 3, 1).reshape(-1, C), Eᵀ, alpha=m). "
            "Is this model an export of anomalib_dsr.Dsr?"
        )
        raise ValueError(msg)
    transpose_a, transpose_b = (product.get_attributes()[key] for key in ("transpose_a", "transpose_b"))
    weights = (codes if transpose_b else codes.T) * factor  # (K, C)
    if transpose_a or weights.shape[1] != channels_last.get_input_partial_shape(0)[1].get_length():
        msg = f"Unexpected nearest-code product at {product.get_friendly_name()}: codes of shape {codes.shape}."
        raise ValueError(msg)
    z = channels_last.input(0).get_source_output()
    scores = ops.convolution(z, weights[:, :, None, None].astype(np.float32), [1, 1], [0, 0], [0, 0], [1, 1])
    scores = ops.add(scores, code_norms.reshape(1, -1, 1, 1).astype(np.float32))  # (B, K, h, w)
    a = search.get_attributes()
    k = search.input(1).get_source_output()
    nearest = ops.topk(scores, k, 1, a["mode"], a["sort"], a["index_element_type"], a["stable"])
    return ops.reshape(ops.transpose(nearest.output(1), [0, 2, 3, 1]), [-1, 1], special_zero=False).output(0)


def keeps_code_path_in_f32(model: ov.Model) -> bool:
    """Whether every operation of ``model``'s code path carries the f32 mark (IRs from ``Dsr.to_openvino`` since
    2026-12-06; not ONNX files, which cannot carry it)."""
    return all(F32_MARK_KEY in node.get_rt_info() for node in code_path(model) if node.get_type_name() != "Parameter")


def keep_code_path_in_f32(xml: Path, *, compress_to_fp16: bool = False) -> None:
    """Rewrite the IR at ``xml`` (and its ``.bin``) so that the code path stays in f32 at any inference
    precision, bf16 and f16 included, while the decoders and U-Nets run at the device's; ``compress_to_fp16``
    stores the other weights in f16 (anomalib's FP16 export)."""
    core = ov.Core()
    # Read into memory, not mapped: the same files are overwritten at the end.
    model = core.read_model(xml.read_bytes(), ov.Tensor(np.fromfile(xml.with_suffix(".bin"), np.uint8)))
    matched = rewrite_code_path(model)
    logger.debug("Code path rewritten for f32: %s", dict(matched))
    names = {node.get_friendly_name() for node in code_path(model)}
    with TemporaryDirectory() as folder:  # the mark reaches OpenVINO only through the IR's XML
        plain = Path(folder) / "model.xml"
        ov.save_model(model, plain, compress_to_fp16=False)
        tree = ElementTree.parse(plain)
        for layer in tree.getroot().iter("layer"):
            if layer.get("name") in names:
                info = layer.find("rt_info")
                if info is None:
                    info = ElementTree.Element("rt_info")
                    layer.insert(0, info)
                if info.find(f"attribute[@name='{F32_MARK['name']}']") is None:
                    ElementTree.SubElement(info, "attribute", F32_MARK)
        weights = ov.Tensor(np.fromfile(plain.with_suffix(".bin"), np.uint8))
        marked = core.read_model(ElementTree.tostring(tree.getroot()), weights)
    ov.save_model(marked, xml, compress_to_fp16=compress_to_fp16)
