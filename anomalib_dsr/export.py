"""OpenVINO export of DSR: INT8 post-training quantisation that keeps the code choices in floating point.

DSR picks codes four times (nearest entries of K_lo and K_hi for the input, then again for the restricted
features; ONNX's ArgMin, OpenVINO's TopK). A feature lying close to the midpoint of two codes flips to the
other code under a small change, and a flipped code changes the reconstructions the anomaly map is made of.
Everything those four choices depend on (the VQ encoders, the restriction modules, the distance computations:
the "code path") therefore stays unquantised; NNCF quantises the decoders and the two U-Nets, most of the
work. NNCF calibrates on the datamodule's normal training images: anomalib's default uses
``val_dataloader()``, which for MVTec-style data is the test split with its defects.

Compile the IR (INT8 too) at f32 inference precision, as :class:`anomalib_dsr.inference.DsrInferencer` does by
default: at bf16, the CPU default with AMX or AVX512-BF16, the code path runs in bf16 as well and codes flip.
OpenVINO 2026.4's CPU plugin does not keep marked operations (``DisablePrecisionConversion``) in f32 once its
own transformations have replaced them, the input resize first (docs/deployment.md).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import openvino as ov
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
