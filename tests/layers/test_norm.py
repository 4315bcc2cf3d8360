"""The layers' InstanceNorm (``anomalib_dsr.model.layers.InstanceNorm2d``): as accurate as ``nn.InstanceNorm2d``
against float64, on channels of large mean and tiny spread too, in both memory layouts and in a captured graph; the
same values and gradients; its input overwritten only when asked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anomalib_dsr.model.layers.norm import InstanceNorm2d

LAYOUTS = pytest.mark.parametrize(
    "layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"]
)
# Errors this small are rounding of the normalised values (up to ~5 in magnitude, float32 ulp 5e-7), where neither
# formulation is better.
ROUNDING = 1e-6


def channels(shape: tuple[int, ...], mean: float, std: float, layout: torch.memory_format) -> torch.Tensor:
    """float32 channels of the given mean and spread, ``shape`` ``(B, C, H, W)``, in ``layout``."""
    generator = torch.Generator().manual_seed(0)
    x = mean + std * torch.randn(shape, generator=generator, dtype=torch.float64)
    return x.float().contiguous(memory_format=layout)


@LAYOUTS
@pytest.mark.parametrize("captured", [False, True], ids=["eager", "torch.export"])
@pytest.mark.parametrize("shape", [(2, 16, 256, 256), (4, 128, 16, 16)], ids=["16x256x256", "128x16x16"])
@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (100.0, 1e-3), (100.0, 1e-2), (1000.0, 1.0), (5.0, 1e-4)])
def test_as_accurate_as_nn_instance_norm(
    mean: float, std: float, shape: tuple[int, ...], captured: bool, layout: torch.memory_format
) -> None:
    """Largest error against float64 ``instance_norm`` on the same float32 input: no larger than
    ``nn.InstanceNorm2d``'s (which is ~2e-3 at mean 100, std 1e-3; ours ~2e-7)."""
    x = channels(shape, mean, std, layout)
    exact = F.instance_norm(x.double(), eps=1e-5)
    norm = InstanceNorm2d(shape[1])
    if captured:  # what ONNX/OpenVINO export and torch.compile see
        norm = torch.export.export(norm, (x,)).module()
    ours = (norm(x).double() - exact).abs().max().item()
    theirs = (nn.InstanceNorm2d(shape[1])(x).double() - exact).abs().max().item()
    assert ours <= max(theirs, ROUNDING), (ours, theirs)


@LAYOUTS
@pytest.mark.parametrize("inplace", [False, True])
def test_values_and_gradients_of_instance_norm(layout: torch.memory_format, inplace: bool) -> None:
    """float64, so that only formulas count: the values and input gradients of ``F.instance_norm``.
    ``inplace`` overwrites the input with its centred copy, in either layout."""
    generator = torch.Generator().manual_seed(0)
    x = 100 + 1e-2 * torch.randn(2, 8, 16, 16, generator=generator, dtype=torch.float64)
    x = x.contiguous(memory_format=layout).requires_grad_()
    weights = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    expected = F.instance_norm(x, eps=1e-5)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)

    source = x.clone()  # a non-leaf, as a convolution's output is
    before = source.detach().clone()
    out = InstanceNorm2d(8, inplace=inplace)(source)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    # Other kernels than F.instance_norm's, in float64: x − mean errs by ulp(100) = 1.4e-14, 1.4e-12 of the spread
    # (1e-2), so the normalised values (up to ~5) by ~1e-11 and the gradients by ~1e-11 relative, on any CPU; a wrong
    # formula (unbiased variance, eps misplaced, a term of the gradient lost) moves them by 1e-5 or more.
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9)  # gradients ~100: rstd is ~100 here
    assert torch.equal(source.detach(), before) != inplace  # exact: the input is either untouched or overwritten
