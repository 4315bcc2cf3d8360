"""The switch between fp32 and bf16 autocast training, chosen by what the device computes natively."""

from __future__ import annotations

import os

import torch

TRAINING_PRECISIONS = ("fp32", "bf16", "auto")
# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) at or above AVX512_CORE_BF16 contain one of these.
NATIVE_BF16_ISA_MARKS = ("BF16", "AMX", "FP16", "AVX10", "ALL", "DEFAULT")


def has_native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bf16 convolutions natively, so that bf16 autocast makes a step faster.

    CPU: AMX or AVX512-BF16, and a oneDNN allowed to use them (``ONEDNN_MAX_CPU_ISA`` may cap it below; CPUs without
    these instructions emulate bf16, slower than fp32). CUDA: ``torch.cuda.is_bf16_supported()``. Others: no.
    """
    if device_type == "cpu":
        native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
        cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
        allowed = any(mark in cap for mark in NATIVE_BF16_ISA_MARKS)
        return bool(native and allowed and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def check_training_precision(precision: str) -> None:
    """Raise a ValueError naming the valid values unless ``precision`` is one of :data:`TRAINING_PRECISIONS`."""
    if precision not in TRAINING_PRECISIONS:
        msg = f"training_precision must be one of {TRAINING_PRECISIONS}, got {precision!r}."
        raise ValueError(msg)


def resolve_training_precision(precision: str, device_type: str) -> str:
    """``"fp32"`` or ``"bf16"``: ``precision`` itself, or for ``"auto"`` bf16 where :func:`has_native_bf16`."""
    check_training_precision(precision)
    if precision != "auto":
        return precision
    return "bf16" if has_native_bf16(device_type) else "fp32"
