"""The 3x3 convolution of the modules after the last code choice, computed at CPU inference by the fastest of
several algorithms (:mod:`anomalib_dsr.model.layers.autotune`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from anomalib_dsr.model.layers import autotune, winograd
from anomalib_dsr.model.layers.tap_sums import tap_sum_conv3x3


class TimedConv3x3(nn.Conv2d):
    """Convolution 3x3, padding 1: ``(B, in, h, w)`` → ``(B, out, h, w)``. In inference on CPU in float32
    (:func:`~anomalib_dsr.model.layers.autotune.timed_inference`) the fastest of up to four algorithms, chosen by
    timing (:mod:`~anomalib_dsr.model.layers.autotune`):

    - in an NNPACK section (``run_fastest``), NNPACK's Winograd convolution F(6x6, 3x3), one image at a time (its
      inference algorithm);
    - elsewhere, whichever was measured fastest for its architecture, image shape and thread count
      (``fastest_algorithm``): oneDNN's direct convolution (``nn.Conv2d``'s), the Winograd convolution F(4x4, 3x3)
      as matrix products (:mod:`anomalib_dsr.model.layers.winograd`), and for layers with at most a ninth as many
      filters as input channels (the U-Nets' last) the tap sums of :mod:`anomalib_dsr.model.layers.tap_sums`.

    Otherwise ``nn.Conv2d``'s. For the modules after the last code choice only: both Winograd algorithms' float32
    error is about 10x oneDNN's direct convolution's (1-2e-5 of the output's scale against 2e-6), the kind that
    cuDNN's Winograd kernels give on GPUs. Not for modules ahead of a quantiser, where that rounding could flip a code
    at a tie: the subspace restriction modules keep ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not autotune.timed_inference(self, x):
            return super().forward(x)
        if autotune.NNPACK_SECTION.get():
            weight = self.weight.contiguous()  # NNPACK reads NCHW; Dsr(channels_last=True) keeps weights channels_last
            images = x.contiguous().split(1)
            outputs = [torch._nnpack_spatial_convolution(image, weight, self.bias, self.padding) for image in images]
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        algorithms = self.algorithms(x)
        return algorithms[autotune.fastest_algorithm(self, x, algorithms)](x)

    def algorithms(self, x: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The algorithms outside NNPACK sections that can compute ``x``, by name, oneDNN's first."""
        algorithms = {"oneDNN": super().forward}
        if winograd.supported(x):
            algorithms["matrix-product Winograd"] = partial(
                winograd.winograd_conv3x3, weight=self.weight, bias=self.bias
            )
        if 9 * self.out_channels <= self.in_channels:
            algorithms["tap sums"] = partial(tap_sum_conv3x3, weight=self.weight, bias=self.bias)
        return algorithms
