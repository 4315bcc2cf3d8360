"""Deployment helpers: input checks in front of anomalib's ``OpenVINOInferencer`` for exported DSR models.

An exported DSR graph (``Engine.export`` / ``anomalib export``) takes RGB images ``(B, 3, H, W)`` in [0, 1]
of any size and contains the resize, the model, anomalib's normalisation and thresholds.
``anomalib.deploy.OpenVINOInferencer`` feeds it whatever array it is given: a grayscale image fails with
an OpenVINO shape error, an RGBA array reaches the graph as (1, H, W, 4) and fails the same way, and a
``uint8`` array whose maximum is at most 1 is not rescaled. ``to_rgb`` converts every input to an RGB
``float32`` array in [0, 1] (grayscale → replicated channels, RGBA / LA → alpha dropped) or raises a
``ValueError`` that says what was wrong; ``DsrInferencer`` applies it before predicting.

Example:
    >>> from anomalib_dsr.deploy.inference import DsrInferencer
    >>> inferencer = DsrInferencer("results/weights/openvino/model.xml", precision="f32")
    >>> prediction = inferencer.predict("part.png")
    >>> prediction.pred_score, prediction.anomaly_map.shape
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch
from anomalib.data import NumpyImageBatch
from anomalib.deploy import OpenVINOInferencer
from PIL import Image

from anomalib_dsr.deploy.export import keeps_code_path_in_f32

ImageLike = str | Path | np.ndarray | Image.Image | torch.Tensor

# OpenVINO's CPU plugin runs in bf16 on CPUs with AMX (and f16 on some others) unless told otherwise.
PRECISIONS = ("f32", "bf16", "f16")


def to_rgb(image: ImageLike) -> np.ndarray:
    """``image`` as an RGB ``float32`` array ``(H, W, 3)`` in [0, 1].

    Accepts a file path (PNG, JPG, ... read with PIL), a PIL image of any mode, a numpy array
    ``(H, W)``, ``(H, W, 1|3|4)`` (channels last) or ``(1|3|4, H, W)`` (channels first), or a torch tensor
    laid out like the arrays. Integer arrays are divided by their dtype's maximum (``uint8`` by 255);
    float arrays must already be in [0, 1]. Grayscale is replicated to three channels and an alpha
    channel is dropped; anything else raises ``ValueError``.
    """
    if isinstance(image, str | Path):
        path = Path(image)
        if not path.is_file():
            msg = f"Image file {path} does not exist."
            raise FileNotFoundError(msg)
        with Image.open(path) as opened:
            return to_rgb(opened)
    if isinstance(image, Image.Image):
        mode = image.mode
        if mode in {"I", "I;16", "I;16B", "I;16L", "F"}:  # 16/32-bit grayscale: scale by the dtype, not by 255
            return to_rgb(np.asarray(image))
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        msg = f"Cannot read an image from {type(image).__name__}: pass a path, a PIL image, a numpy array or a tensor."
        raise TypeError(msg)

    array = image
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[0] in {1, 3, 4} and array.shape[-1] not in {1, 3, 4}:
        array = array.transpose(1, 2, 0)  # channels first → last
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in {1, 2, 3, 4}:
        msg = (
            f"DSR expects one RGB image (H, W, 3), grayscale (H, W) or RGBA (H, W, 4), got an array of shape "
            f"{tuple(image.shape)}. Pass batches image by image, or call the compiled model directly with "
            "an array of shape (B, 3, H, W)."
        )
        raise ValueError(msg)

    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        scale = 1.0 if array.dtype == np.bool_ else float(np.iinfo(array.dtype).max)
        array = array.astype(np.float32) / scale
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            msg = (
                f"Float images must be in [0, 1], got values in [{low:.3g}, {high:.3g}]. "
                "Divide 8-bit images by 255 (or pass them as uint8); DSR takes no mean/std normalisation."
            )
            raise ValueError(msg)
    else:
        msg = f"Unsupported image dtype {array.dtype}."
        raise ValueError(msg)

    channels = array.shape[-1]
    if channels in {1, 2}:  # grayscale, grayscale + alpha
        array = np.repeat(array[..., :1], 3, axis=-1)
    elif channels == 4:  # RGBA: drop alpha
        array = array[..., :3]
    return np.ascontiguousarray(array)


def openvino_config(precision: str | None = "f32", config: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenVINO compile configuration with ``INFERENCE_PRECISION_HINT`` set to ``precision``.

    ``precision=None`` keeps the device's default (bf16 on CPUs with AMX, f32 on most others).
    """
    config = dict(config or {})
    if precision is not None:
        if precision not in PRECISIONS:
            msg = f"precision must be one of {PRECISIONS} or None (device default), got {precision!r}."
            raise ValueError(msg)
        config.setdefault("INFERENCE_PRECISION_HINT", precision)
    return config


class DsrInferencer(OpenVINOInferencer):
    """``OpenVINOInferencer`` that converts its input with ``to_rgb`` and compiles at a chosen precision.

    Args:
        path: exported model (``.xml``/``.bin`` or ``.onnx``).
        device: OpenVINO device (default ``"CPU"``).
        precision: ``"f32"`` (default: matches the PyTorch model most closely), ``"bf16"``, ``"f16"``, or ``None``
            for the device's default (bf16 on CPUs with AMX or AVX512-BF16: the same accuracy, faster). Anything but
            f32 warns for a model that does not keep the code path in f32 (ONNX files, IRs exported before
            2026-12-06).
        config: further OpenVINO properties.
    """

    def __init__(
        self,
        path: str | Path | tuple[bytes, bytes],
        device: str | None = "CPU",
        precision: str | None = "f32",
        config: dict[str, Any] | None = None,
    ) -> None:
        config = openvino_config(precision, config)
        if config.get("INFERENCE_PRECISION_HINT") != "f32" and isinstance(path, str | Path):
            model_file = Path(path).with_suffix(".xml") if Path(path).suffix == ".bin" else path  # as anomalib reads it
            if not keeps_code_path_in_f32(ov.Core().read_model(model_file)):
                warnings.warn(
                    f"{path} does not keep DSR's code path in f32 (an ONNX file, or an IR exported before "
                    f"2026-12-06): at precision {precision or 'the device default (bf16 on AMX CPUs)'} its codes "
                    "change and so do its scores. Export it again with Dsr.to_openvino / anomalib export, or pass "
                    "precision='f32'.",
                    stacklevel=2,
                )
        super().__init__(path, device=device, config=config)

    def predict(self, image: ImageLike) -> NumpyImageBatch:  # type: ignore[override]
        """Predict on one image (path, PIL image, array or tensor; grayscale and RGBA are converted)."""
        return super().predict(to_rgb(image))
