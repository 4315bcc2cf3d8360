"""Whether the model is being captured as a graph, where eager-only fast paths must give way to plain ops."""

from __future__ import annotations

import torch


def capturing_graph() -> bool:
    """Whether the model is being traced or exported (ONNX, torch.export, torch.compile, TorchScript)."""
    return (
        torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
    )
