"""The timed choice of algorithms at CPU inference, like cuDNN's benchmark mode, and the switch that fixes it.

Layers that can compute their output in several ways (:class:`~anomalib_dsr.model.layers.timed_conv.TimedConv3x3`,
:class:`~anomalib_dsr.model.layers.sampling.Upsample2x`) ask :func:`fastest_algorithm`; modules made of such
convolutions (the U-Nets, D_spc) run them through :func:`run_fastest`, which also times NNPACK's Winograd for the
whole module. The choices are measured once per architecture, input shape, layout and thread count in the process.

Algorithms differ in float32 rounding. For reproducible inference fix them, for a block with
:func:`fixed_algorithms` or for the process with the environment variable ``ANOMALIB_DSR_ALGORITHMS``: a
comma-separated list of algorithm names in order of preference (:data:`ALGORITHMS`); each layer takes the first it
offers, else its own (oneDNN's convolution, torch's upsampling); ``NNPACK`` in the list runs whole modules in NNPACK
sections. ``ANOMALIB_DSR_ALGORITHMS=own`` gives every layer its own algorithm, as in training.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache, partial
from typing import NamedTuple

import torch
from torch import nn

from anomalib_dsr.model.layers.graph_capture import capturing_graph

logger = logging.getLogger(__name__)

ENV_VARIABLE = "ANOMALIB_DSR_ALGORITHMS"
NNPACK = "NNPACK"
# Every algorithm name a layer may offer; "own" stands for each layer's own (the first it lists).
ALGORITHMS = ("own", "oneDNN", "matrix-product Winograd", "tap sums", "torch", "matrix products", NNPACK)


class Fixed(NamedTuple):
    """Fixed algorithms: preferred names, and whether modules run NNPACK sections."""

    names: tuple[str, ...]
    nnpack: bool


_FIXED: ContextVar[Fixed | None] = ContextVar("dsr_fixed_algorithms", default=None)


def _parse(names: tuple[str, ...], source: str) -> Fixed:
    unknown = [name for name in names if name not in ALGORITHMS]
    if unknown:
        msg = f"Unknown algorithm name(s) {unknown} in {source}; valid names: {', '.join(ALGORITHMS)}."
        raise ValueError(msg)
    return Fixed(tuple(name for name in names if name != NNPACK), NNPACK in names)


@contextmanager
def fixed_algorithms(*names: str, nnpack: bool = False) -> Iterator[None]:
    """Inside the block no layer times anything: each takes the first of ``names`` it offers, else its own; modules
    run NNPACK sections only if ``nnpack``. Overrides ``ANOMALIB_DSR_ALGORITHMS``.

    Example:
        >>> with fixed_algorithms():  # every layer's own algorithm: the same float32 rounding as training's
        ...     scores = model(images)
    """
    fixed = _parse(names, "fixed_algorithms()")
    token = _FIXED.set(Fixed(fixed.names, nnpack or fixed.nnpack))
    try:
        yield
    finally:
        _FIXED.reset(token)


def fixed() -> Fixed | None:
    """The algorithms fixed by :func:`fixed_algorithms` or ``ANOMALIB_DSR_ALGORITHMS``, or None where timed."""
    if (chosen := _FIXED.get()) is not None:
        return chosen
    value = os.environ.get(ENV_VARIABLE, "").strip()
    if not value:
        return None
    return _parse(tuple(name.strip() for name in value.split(",")), f"{ENV_VARIABLE}={value!r}")


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


# Whether TimedConv3x3 layers run NNPACK in the current section (see run_fastest); outside sections they do not.
NNPACK_SECTION: ContextVar[bool] = ContextVar("dsr_nnpack", default=False)
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
    """Around a run of :class:`TimedConv3x3` layers on ``x``: NNPACK's Winograd convolutions if ``nnpack``, else
    each layer's measured choice. With NNPACK on one image, torch's other ops (InstanceNorm, ReLU, pooling,
    upsampling, cat) run on the calling thread only, the convolutions on all of NNPACK's threads: NNPACK has its own
    thread pool beside torch's OpenMP threads, and the idle workers of each spin for some milliseconds after each use,
    taking a core from the other pool's work. Restores the calling thread's count and the choice on exit."""
    token = NNPACK_SECTION.set(nnpack)
    threads = torch.get_num_threads()
    one_thread = nnpack and x.shape[0] == 1 and threads > 1
    if one_thread:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if one_thread:
            torch.set_num_threads(threads)
        NNPACK_SECTION.reset(token)


def run_fastest(module: nn.Module, x: torch.Tensor, body: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``body(x)``, a run of ``module``'s :class:`TimedConv3x3` layers, in the faster :func:`convolution_section`.

    Which one is faster depends on the CPU, the shapes and the threads (docs/speed.md). So, as cuDNN's benchmark mode
    does, the first inference call of a module of this :func:`architecture` in the process, for each input shape and
    thread count, times both (alternating, best of two each) and keeps the faster; the times are logged. Algorithms
    fixed by :func:`fixed_algorithms` or ``ANOMALIB_DSR_ALGORITHMS`` are taken untimed. Outside timed inference
    (:func:`timed_inference`) ``body`` runs as it is.
    """
    if not timed_inference(module, x):
        return body(x)
    if (chosen := fixed()) is not None:
        nnpack = chosen.nnpack and _nnpack_ready()
    else:
        key = (architecture(module), tuple(x.shape), torch.get_num_threads())
        if key not in _FASTEST:
            _FASTEST[key] = _nnpack_ready() and _nnpack_is_faster(module, x, body)
        nnpack = _FASTEST[key]
    with convolution_section(x, nnpack=nnpack):
        return body(x)


def _nnpack_is_faster(module: nn.Module, x: torch.Tensor, body: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Time ``body(x)`` in an NNPACK section and in a section of the layers' own choices."""

    def run(nnpack: bool) -> None:
        with convolution_section(x, nnpack=nnpack):
            body(x)

    choice, times = _fastest({"NNPACK Winograd": partial(run, True), "per-layer choice": partial(run, False)})
    logger.info(
        "%s on %s: NNPACK Winograd %.1f ms, per-layer choice %.1f ms per call: using %s",
        type(module).__name__,
        tuple(x.shape),
        1e3 * times["NNPACK Winograd"],
        1e3 * times["per-layer choice"],
        choice,
    )
    return choice == "NNPACK Winograd"


def fastest_algorithm(
    module: nn.Module, x: torch.Tensor, algorithms: dict[str, Callable[[torch.Tensor], torch.Tensor]]
) -> str:
    """The name of whichever of ``algorithms`` (at least one; the first is the layer's own) computes ``x`` fastest for
    ``module``: timed on ``x``'s first image only (so a batch costs no more to time than one image), once per layer
    :func:`architecture`, image shape, layout and thread count in the process, then remembered for every layer
    alike; logged at debug level. Algorithms fixed by :func:`fixed_algorithms` or ``ANOMALIB_DSR_ALGORITHMS`` are
    taken untimed."""
    if len(algorithms) == 1:
        return next(iter(algorithms))
    if (chosen := fixed()) is not None:
        return next((name for name in chosen.names if name in algorithms), next(iter(algorithms)))
    image_shape = tuple(x.shape[1:])
    key = (architecture(module), image_shape, x.is_contiguous(), torch.get_num_threads())
    if key not in _ALGORITHM:
        image = x[:1]
        _ALGORITHM[key], times = _fastest({name: partial(run, image) for name, run in algorithms.items()})
        logger.debug(
            "%s on %s: %s per image: using %s",
            module,
            image_shape,
            ", ".join(f"{name} {1e3 * seconds:.2f} ms" for name, seconds in times.items()),
            _ALGORITHM[key],
        )
    return _ALGORITHM[key]
