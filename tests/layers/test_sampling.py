"""Sampling layers: ``Upsample2x`` (torch's kernel or matrix products, chosen by timing at inference) and
``MaxPool2x2`` (``max_pool2d``'s values without its argmax at inference, its gradient in training)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomalib_dsr.model.layers.sampling import MaxPool2x2, Upsample2x


@pytest.mark.parametrize(("height", "width"), [(32, 32), (5, 12), (1, 1)])
def test_upsampling_by_matrix_products_is_bilinear_with_aligned_corners(
    height: int, width: int, force_algorithms
) -> None:
    """At inference, when chosen, the matrix products are float64's bilinear x2 with aligned corners within 1e-6 of
    the scale (torch's float32 kernel: up to 3e-5); elsewhere ``nn.Upsample``'s exact values."""
    torch.manual_seed(0)
    up = Upsample2x().eval()
    x = torch.randn(2, 3, height, width)
    exact = F.interpolate(x.double(), scale_factor=2, mode="bilinear", align_corners=True)
    torch_kernel = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    # exact by construction (here and in training below): nn.Upsample's forward is this very F.interpolate call
    assert torch.equal(up(x), torch_kernel)  # autograd on
    force_algorithms("matrix products")
    with torch.no_grad():
        fast = up(x)
        assert torch.equal(up.train()(x), torch_kernel)
    assert fast.shape == exact.shape
    assert (fast.double() - exact).abs().max() < 1e-6 * exact.abs().max()
    if height > 1:  # the products' rounding, not torch's kernel's (errs by up to 3e-5): the path is taken
        assert not torch.equal(fast, torch_kernel)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_max_pool_without_autograd_has_max_pool2d_values_and_keeps_its_gradient(layout: torch.memory_format) -> None:
    """Inference: the row-pair/column-pair maximum equals max_pool2d exactly; with autograd nn.MaxPool2d's
    gradient (the whole gradient to one element of a tied window, not split); odd sides floored."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 12).contiguous(memory_format=layout)
    x[:, :, 0, 0] = x[:, :, 0, 1]  # ties
    with torch.no_grad():  # exact by construction: a maximum picks one of its inputs, no rounding in any order
        assert torch.equal(MaxPool2x2()(x), F.max_pool2d(x, 2))
        assert torch.equal(MaxPool2x2()(x[..., :11]), F.max_pool2d(x[..., :11], 2))
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(MaxPool2x2()(leaf).sum(), leaf)
    (expected,) = torch.autograd.grad(F.max_pool2d(leaf, 2).sum(), leaf)
    assert torch.equal(grad, expected)  # exact: the same max_pool2d backward; gradients of 0 and 1 only
    assert set(grad.unique().tolist()) == {0.0, 1.0}
