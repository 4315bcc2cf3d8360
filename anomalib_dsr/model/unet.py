"""U-Net of the anomaly detection and upsampling modules (SPEC §2), and its conv blocks."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_dsr.model import winograd
from anomalib_dsr.model.graph_capture import capturing_graph
from anomalib_dsr.model.tap_sums import tap_sum_conv3x3

logger = logging.getLogger(__name__)


class InstanceNorm2d(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` (no affine, no running statistics), computed stably and fast: ``(B, C, H, W)`` → same.

    The same normalisation (per image and channel over ``H x W``, biased variance, the same eps), applied to the
    input minus its per-channel mean. That leaves the result unchanged, but float32 kernels cancel on a channel of
    large mean and small spread (E[x²] − E[x]², ``x * scale + shift``). On 8x128x32x32 channels of mean 100 and std
    1e-3 the largest error against float64 is 1e-7 this way, 2e-3 for ``nn.InstanceNorm2d``, 4e-3 for plain
    ``group_norm`` and 1.3 for ``group_norm`` on a channels_last tensor.

    - NCHW input (training): ``group_norm`` with one channel per group; on CPU a full-resolution U-Net block
      (8x64x256x256) runs 11–14 % faster than with ``instance_norm``, forward and backward.
    - channels_last input (inference): the centred channels' residual mean and second moment, then one
      ``addcmul``. ``group_norm``'s channels_last kernel loses up to 4e-5 even on centred 256x256 channels, and an
      NCHW copy costs more than oneDNN's channels_last convolutions save.
    - Graph capture (ONNX/OpenVINO export, ``torch.export``, ``torch.compile``): the mean, a subtraction and
      ``instance_norm``; exported graphs are centred too, and OpenVINO's normalisation has the same weakness.

    Args:
        num_features: channels C.
        inplace: subtract the mean in the input tensor itself, which saves allocating a copy (on CPU about as
            costly as the normalisation); only for inputs nothing else reads, like a convolution's output.
    """

    def __init__(self, num_features: int, *, inplace: bool = False) -> None:
        super().__init__(num_features)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if capturing_graph():
            return super().forward(x - x.mean(dim=(2, 3), keepdim=True))
        if self.training or torch.is_grad_enabled():
            return self._normalise(x)
        # At inference a bf16 input (autocast) is normalised in bf16 by group_norm, which accumulates in fp32: autocast
        # would run it in fp32, a copy of every activation there and back, and centring first buys nothing at bf16's
        # 3 significant digits (the mean of a bf16 channels_last map costs more than the normalisation). Training
        # (also phase 3's pass through the frozen phase-2 modules) keeps autocast's choices.
        with torch.autocast(x.device.type, enabled=False):
            if x.dtype == torch.bfloat16:
                return F.group_norm(x, x.shape[1], eps=self.eps)
            return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # No gradient through the mean: the output does not depend on it.
        mean = x.mean(dim=(2, 3), keepdim=True).detach()
        centred = x.sub_(mean) if self.inplace else x - mean
        if centred.is_contiguous():
            return F.group_norm(centred, x.shape[1], eps=self.eps)
        residual = centred.mean(dim=(2, 3), keepdim=True)
        variance = (centred * centred).mean(dim=(2, 3), keepdim=True) - residual * residual
        rstd = (variance + self.eps).rsqrt()
        return torch.addcmul(-residual * rstd, centred, rstd)


@cache
def _nnpack_ready() -> bool:
    """Whether NNPACK is built in. Asking initialises it, without which its convolution fails, and a first tiny
    convolution creates its thread pool, which keeps the size torch's thread count has then (so never inside
    :func:`convolution_section`)."""
    if not torch.backends.nnpack.is_available():
        return False
    torch._nnpack_spatial_convolution(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3), None, (1, 1))
    return True


def timed_inference(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` may compute ``x`` with the algorithms it times (:func:`fastest_algorithm`,
    :func:`run_fastest`): eval mode, no autograd, CPU, float32, no autocast, no graph capture."""
    return not (
        module.training
        or torch.is_grad_enabled()
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or torch.is_autocast_enabled("cpu")
        or capturing_graph()
    )


def _fastest(candidates: dict[str, Callable[[], object]]) -> tuple[str, dict[str, float]]:
    """The name of the fastest of ``candidates``: one warm-up call each, then the best of two rounds that call each in
    turn; also each one's best time in seconds."""
    best = dict.fromkeys(candidates, math.inf)
    for timed in (False, True, True):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            if timed:
                best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.__getitem__), best


# Whether WinogradConv2d layers run NNPACK in the current section (see run_fastest); outside sections they do not.
_NNPACK: ContextVar[bool] = ContextVar("dsr_nnpack", default=False)
# The measured choices, process-wide like cuDNN's benchmark cache, so that every model of one architecture in a
# process computes alike (a checkpoint's copy, a resumed run, a model validated in training and then tested):
# by (module architecture, input shape, torch threads), True = NNPACK's Winograd, False = each layer's own choice.
_FASTEST: dict[tuple, bool] = {}
# By (layer architecture, image shape, contiguity, torch threads), the name of the layer's fastest algorithm.
_ALGORITHM: dict[tuple, str] = {}


def architecture(module: nn.Module) -> tuple:
    """What decides the timed choices besides the input: the module's type and its parameters' names and shapes."""
    return type(module).__name__, tuple((name, tuple(p.shape)) for name, p in module.named_parameters())


@contextmanager
def convolution_section(x: torch.Tensor, *, nnpack: bool) -> Iterator[None]:
    """Around a run of :class:`WinogradConv2d` layers on ``x``: NNPACK's Winograd convolutions if ``nnpack``, else
    each layer's measured choice. With NNPACK on one image, torch's other ops (InstanceNorm, ReLU, pooling,
    upsampling, cat) run on the calling thread only, the convolutions on all of NNPACK's threads: NNPACK has its own
    thread pool beside torch's OpenMP threads, and the idle workers of each spin for some milliseconds after each use,
    taking a core from the other pool's work. Restores the calling thread's count and the choice on exit."""
    token = _NNPACK.set(nnpack)
    threads = torch.get_num_threads()
    one_thread = nnpack and x.shape[0] == 1 and threads > 1
    if one_thread:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if one_thread:
            torch.set_num_threads(threads)
        _NNPACK.reset(token)


def run_fastest(module: nn.Module, x: torch.Tensor, body: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``body(x)``, a run of ``module``'s :class:`WinogradConv2d` layers, in the faster :func:`convolution_section`.

    Which one is faster depends on the CPU, the shapes and the threads: on a 2-core AMD EPYC Zen 4 NNPACK's Winograd
    made a paper-width U-Net about 1.4x faster at batch 1, on a 2-core Intel Xeon (Sapphire Rapids) the layers' own
    choices of oneDNN's direct convolution and the matrix-product Winograd are faster (docs/speed.md). So, as cuDNN's
    benchmark mode does, the first inference call of a module of this :func:`architecture` in the process, for each
    input shape and thread count, times both (alternating, best of two each) and keeps the faster; the times are
    logged. Outside timed inference (:func:`timed_inference`) ``body`` runs as it is.
    """
    if not timed_inference(module, x):
        return body(x)
    key = (architecture(module), tuple(x.shape), torch.get_num_threads())
    if key not in _FASTEST:
        _FASTEST[key] = _nnpack_ready() and _nnpack_is_faster(module, x, body)
    with convolution_section(x, nnpack=_FASTEST[key]):
        return body(x)


def _nnpack_is_faster(module: nn.Module, x: torch.Tensor, body: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Time ``body(x)`` in an NNPACK section and in a section of the layers' own choices."""

    def run(nnpack: bool) -> None:
        with convolution_section(x, nnpack=nnpack):
            body(x)

    choice, times = _fastest({"NNPACK Winograd": partial(run, True), "per-layer choice": partial(run, False)})
    logger.info(
        "%s on %s: NNPACK Winograd %.1f ms, per-layer choice %.1f ms per call: using %s",
        type(module).__name__, tuple(x.shape), 1e3 * times["NNPACK Winograd"], 1e3 * times["per-layer choice"], choice,
    )
    return choice == "NNPACK Winograd"


def fastest_algorithm(
    module: nn.Module, x: torch.Tensor, algorithms: dict[str, Callable[[torch.Tensor], torch.Tensor]]
) -> str:
    """The name of whichever of ``algorithms`` (at least one; the first is the layer's own) computes ``x`` fastest for
    ``module``: timed on ``x``'s first image only (so a batch costs no more to time than one image), once per layer
    :func:`architecture`, image shape, layout and thread count in the process, then remembered for every layer
    alike; logged at debug level."""
    if len(algorithms) == 1:
        return next(iter(algorithms))
    image_shape = tuple(x.shape[1:])
    key = (architecture(module), image_shape, x.is_contiguous(), torch.get_num_threads())
    if key not in _ALGORITHM:
        image = x[:1]
        _ALGORITHM[key], times = _fastest({name: partial(run, image) for name, run in algorithms.items()})
        logger.debug(
            "%s on %s: %s per image: using %s",
            module, image_shape, ", ".join(f"{name} {1e3 * seconds:.2f} ms" for name, seconds in times.items()),
            _ALGORITHM[key],
        )
    return _ALGORITHM[key]


class WinogradConv2d(nn.Conv2d):
    """Convolution 3x3, padding 1: ``(B, in, h, w)`` → ``(B, out, h, w)``. In inference on CPU in float32
    (:func:`timed_inference`) the fastest of up to four algorithms, chosen by timing:

    - in an NNPACK section (:func:`run_fastest`), NNPACK's Winograd convolution F(6x6, 3x3), one image at a time (its
      inference algorithm);
    - elsewhere, whichever was measured fastest for its architecture, image shape and thread count
      (:func:`fastest_algorithm`): oneDNN's direct convolution (``nn.Conv2d``'s), the Winograd convolution F(4x4, 3x3)
      as matrix products (:mod:`anomalib_dsr.model.winograd`; on a 2-core Intel Xeon up to 1.7x faster on maps up to
      128x128, slower on 256x256), and for layers with at most a ninth as many filters as input channels (the U-Nets'
      last) the tap sums of :mod:`anomalib_dsr.model.tap_sums`.

    Otherwise ``nn.Conv2d``'s. For the modules after the last code choice only: both Winograd algorithms' float32
    error is about 10x oneDNN's direct convolution's (1-2e-5 of the output's scale against 2e-6), the kind that
    cuDNN's Winograd kernels give on GPUs. Not for modules ahead of a quantiser, where that rounding could flip a code
    at a tie: the subspace restriction modules keep ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not timed_inference(self, x):
            return super().forward(x)
        if _NNPACK.get():
            weight = self.weight.contiguous()  # NNPACK reads NCHW; Dsr(channels_last=True) keeps weights channels_last
            images = x.contiguous().split(1)
            outputs = [torch._nnpack_spatial_convolution(image, weight, self.bias, self.padding) for image in images]
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        algorithms = self.algorithms(x)
        return algorithms[fastest_algorithm(self, x, algorithms)](x)

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


class MaxPool2x2(nn.MaxPool2d):
    """Max-pool 2x2, stride 2: ``(B, C, h, w)`` → ``(B, C, h/2, w/2)``, h and w even. Without autograd on CPU
    (no graph capture) the maximum of the row pairs, then of the column pairs: the same values, about 10x faster
    than ``max_pool2d``'s CPU kernel at batch 1, which also writes the argmax indices (64x256x256: 1.1 ms against
    12 ms). Training keeps ``nn.MaxPool2d``'s gradient, which goes to one element of a tied window; odd sides
    get its flooring.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu" or capturing_graph() or x.shape[-1] % 2 or x.shape[-2] % 2:
            return super().forward(x)
        rows = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


class Upsample2x(nn.Upsample):
    """Bilinear x2 upsampling with aligned corners: ``(B, C, h, w)`` → ``(B, C, 2h, 2w)``. At inference on CPU
    (:func:`timed_inference`) either torch's kernel or two matrix products with the interpolation matrices
    ``(2w, w)`` and ``(2h, h)``, whichever :func:`fastest_algorithm` measures faster: torch's kernel is slow on small
    maps (256x32x32 on a 2-core Intel Xeon, 2026-12-07: 4.8 ms against 0.6 ms), the products' work per pixel grows with
    the side. The products' weights come from float64, so they are nearer to exact (5e-7 of the scale) than torch's
    kernel, whose float32 source coordinates err by up to 3e-5.
    """

    def __init__(self) -> None:
        super().__init__(scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not timed_inference(self, x):
            return super().forward(x)
        algorithms = {"torch": super().forward, "matrix products": _upsample2x_by_matmul}
        return algorithms[fastest_algorithm(self, x, algorithms)](x)


@cache
def _interpolation_matrix(side: int) -> torch.Tensor:
    """``(2 side, side)`` float32: row ``i`` holds the weights of bilinear x2 upsampling with aligned corners, output
    ``i`` at source coordinate ``i (side - 1) / (2 side - 1)``, computed in float64."""
    source = torch.arange(2 * side, dtype=torch.float64) * (side - 1) / (2 * side - 1)
    below = source.floor().long()
    above = (below + 1).clamp(max=side - 1)
    fraction = source - below
    matrix = torch.zeros(2 * side, side, dtype=torch.float64)
    rows = torch.arange(2 * side)
    matrix.index_put_((rows, below), 1 - fraction, accumulate=True)
    matrix.index_put_((rows, above), fraction, accumulate=True)
    return matrix.float()


def _upsample2x_by_matmul(x: torch.Tensor) -> torch.Tensor:
    """:class:`Upsample2x` as ``M_h x M_wᵀ`` per channel: ``(B, C, h, w)`` float32 → ``(B, C, 2h, 2w)``."""
    batch, channels, height, width = x.shape
    rows = x.reshape(-1, width) @ _interpolation_matrix(width).t()  # (B * C * h, 2w)
    upsampled = _interpolation_matrix(height) @ rows.view(-1, height, 2 * width)  # (B * C, 2h, 2w)
    return upsampled.view(batch, channels, 2 * height, 2 * width)


def conv3x3(in_channels: int, out_channels: int, *, timed: bool) -> nn.Conv2d:
    """Convolution 3x3 with padding 1; a :class:`WinogradConv2d` if ``timed`` (inference times its algorithms: for
    modules after the last code choice only)."""
    return WinogradConv2d(in_channels, out_channels) if timed else nn.Conv2d(in_channels, out_channels, 3, padding=1)


def double_conv(in_channels: int, mid_channels: int, out_channels: int, *, timed: bool) -> nn.Sequential:
    """[conv 3x3, InstanceNorm, ReLU] x2; shape ``(B, in, h, w)`` → ``(B, out, h, w)``."""
    return nn.Sequential(
        conv3x3(in_channels, mid_channels, timed=timed),
        InstanceNorm2d(mid_channels, inplace=True),
        nn.ReLU(inplace=True),  # in place: the norm's backward needs its input, not its output
        conv3x3(mid_channels, out_channels, timed=timed),
        InstanceNorm2d(out_channels, inplace=True),
        nn.ReLU(inplace=True),
    )


def up_conv(in_channels: int, out_channels: int, *, timed: bool) -> nn.Sequential:
    """Bilinear x2 (align_corners), conv 3x3, InstanceNorm, ReLU; ``(B, in, h, w)`` → ``(B, out, 2h, 2w)``; if
    ``timed``, the convolution is a :class:`WinogradConv2d` and the upsampling an :class:`Upsample2x`."""
    return nn.Sequential(
        Upsample2x() if timed else nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        conv3x3(in_channels, out_channels, timed=timed),
        InstanceNorm2d(out_channels, inplace=True),
        nn.ReLU(inplace=True),
    )


def init_normal_(module: nn.Module, std: float = 0.02) -> None:
    """Draw every conv and transposed-conv weight from N(0, std) (paper: 0.02, SPEC §2)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(layer.weight, 0.0, std)


class UNetEncoder(nn.Module):
    """Widths ``(w, 2w, 4w, 4w)`` with three max-pools; returns the four feature maps."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.block1 = double_conv(in_channels, width, width, timed=True)
        self.block2 = double_conv(width, 2 * width, 2 * width, timed=True)
        self.block3 = double_conv(2 * width, 4 * width, 4 * width, timed=True)
        self.block4 = double_conv(4 * width, 4 * width, 4 * width, timed=True)
        self.pool = MaxPool2x2()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b1 = self.block1(x)
        b2 = self.block2(self.pool(b1))
        b3 = self.block3(self.pool(b2))
        return b1, b2, b3, self.block4(self.pool(b3))


class UNetDecoder(nn.Module):
    """Upsample, concatenate the skip, two convs per level; final conv 3x3 to ``out_channels`` logits."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.up1 = up_conv(4 * width, 4 * width, timed=True)
        self.db1 = double_conv(8 * width, 4 * width, 4 * width, timed=True)
        self.up2 = up_conv(4 * width, 2 * width, timed=True)
        self.db2 = double_conv(4 * width, 2 * width, 2 * width, timed=True)
        self.up3 = up_conv(2 * width, width, timed=True)
        self.db3 = double_conv(2 * width, width, width, timed=True)
        self.fin_out = nn.Sequential(conv3x3(width, out_channels, timed=True))

    def forward(self, b1: torch.Tensor, b2: torch.Tensor, b3: torch.Tensor, b4: torch.Tensor) -> torch.Tensor:
        x = self.db1(torch.cat((self.up1(b4), b3), dim=1))
        x = self.db2(torch.cat((self.up2(x), b2), dim=1))
        x = self.db3(torch.cat((self.up3(x), b1), dim=1))
        return self.fin_out(x)


class UNet(nn.Module):
    """``(B, in_channels, H, W)`` → 2-class logits ``(B, 2, H, W)``; H and W multiples of 8.

    The anomaly detection module is ``UNet(6)`` on concat(I_spc, I_gen); the upsampling module is
    ``UNet(8)`` on concat(I_spc, I_gen, softmax(M_lo)). Base width 64 is the paper's.
    """

    def __init__(self, in_channels: int, width: int = 64, out_channels: int = 2) -> None:
        super().__init__()
        self.encoder = UNetEncoder(in_channels, width)
        self.decoder = UNetDecoder(width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_fastest(self, x, lambda x: self.decoder(*self.encoder(x)))
