"""Layers of DSR's modules and the CPU kernels behind them, like ``timm.layers``: one job per file.

- ``norm.py``: :class:`InstanceNorm2d`, centred first for float32 accuracy;
- ``sampling.py``: :class:`MaxPool2x2`, :class:`Upsample2x`;
- ``timed_conv.py``: :class:`TimedConv3x3`, the 3x3 convolution that picks its fastest algorithm at CPU inference;
- ``blocks.py``: ``conv3x3``, ``double_conv``, ``up_conv``, ``init_normal_``;
- ``autotune.py``: the timed choice of algorithms and :func:`fixed_algorithms`, the switch that fixes them;
- kernels: ``winograd.py`` (Winograd F(4x4, 3x3) as matrix products), ``tap_sums.py`` (few-filter convolutions);
- ``graph_capture.py``: whether a graph is being captured (export), where fast paths give way to plain ops.
"""

from anomalib_dsr.model.layers.autotune import ENV_VARIABLE, fixed_algorithms, run_fastest
from anomalib_dsr.model.layers.blocks import conv3x3, double_conv, init_normal_, up_conv
from anomalib_dsr.model.layers.graph_capture import capturing_graph
from anomalib_dsr.model.layers.norm import InstanceNorm2d
from anomalib_dsr.model.layers.sampling import MaxPool2x2, Upsample2x
from anomalib_dsr.model.layers.timed_conv import TimedConv3x3

__all__ = [
    "ENV_VARIABLE",
    "InstanceNorm2d",
    "MaxPool2x2",
    "TimedConv3x3",
    "Upsample2x",
    "capturing_graph",
    "conv3x3",
    "double_conv",
    "fixed_algorithms",
    "init_normal_",
    "run_fastest",
    "up_conv",
]
