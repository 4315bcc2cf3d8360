"""The U-Nets' InstanceNorm (``anomalib_dsr.model.unet.InstanceNorm2d``): as accurate as ``nn.InstanceNorm2d`` against
float64, on channels of large mean and tiny spread too, in both memory layouts and in a captured graph; the
same values and gradients; its input overwritten only when asked. The U-Nets' Winograd convolution
(``WinogradConv2d``): taken only at inference, near float64 there, ``nn.Conv2d`` everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anomalib_dsr.model.unet import InstanceNorm2d, MaxPool2x2, UNet, WinogradConv2d, convolution_section

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
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9)  # gradients ~100: rstd is ~100 here
    assert torch.equal(source.detach(), before) != inplace


@pytest.mark.parametrize(("in_channels", "out_channels", "size"), [(6, 64, 128), (128, 64, 64), (512, 512, 16)])
def test_winograd_convolution_at_inference(in_channels: int, out_channels: int, size: int) -> None:
    """eval + no autograd on CPU in float32: Winograd, one image at a time, within 5e-5 of the output's scale of
    float64 (seen: 1-2e-5; oneDNN's direct convolution ~2e-6) and not nn.Conv2d's values (the path is taken)."""
    torch.manual_seed(0)
    conv = WinogradConv2d(in_channels, out_channels).eval()
    x = torch.randn(3, in_channels, size, size).contiguous(memory_format=torch.channels_last)
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    with torch.no_grad():
        fast, direct = conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)
        assert torch.equal(fast[1:2], conv(x[1:2]))  # batch = images one by one
    assert fast.shape == exact.shape
    assert (fast.double() - exact).abs().max() < 5e-5 * exact.abs().max()
    assert not torch.equal(fast, direct)


def test_winograd_convolution_is_nn_conv2d_elsewhere() -> None:
    """Training, autograd, autocast and graph capture (ONNX/OpenVINO export) get nn.Conv2d's exact values; the
    weights are nn.Conv2d's, under the same keys."""
    torch.manual_seed(0)
    conv = WinogradConv2d(16, 8)
    assert conv.state_dict().keys() == nn.Conv2d(16, 8, 3, padding=1).state_dict().keys()
    x = torch.randn(2, 16, 32, 32)
    direct = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert torch.equal(conv.train()(x), direct)  # training
    assert torch.equal(conv.eval()(x), direct)  # autograd on
    with torch.no_grad():
        assert torch.equal(torch.export.export(conv, (x,)).module()(x), direct)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv(x).dtype == torch.bfloat16


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_max_pool_without_autograd_has_max_pool2d_values_and_keeps_its_gradient(layout: torch.memory_format) -> None:
    """Inference: the row-pair/column-pair maximum equals max_pool2d exactly; with autograd nn.MaxPool2d's
    gradient (the whole gradient to one element of a tied window, not split); odd sides floored."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 12).contiguous(memory_format=layout)
    x[:, :, 0, 0] = x[:, :, 0, 1]  # ties
    with torch.no_grad():
        assert torch.equal(MaxPool2x2()(x), F.max_pool2d(x, 2))
        assert torch.equal(MaxPool2x2()(x[..., :11]), F.max_pool2d(x[..., :11], 2))
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(MaxPool2x2()(leaf).sum(), leaf)
    (expected,) = torch.autograd.grad(F.max_pool2d(leaf, 2).sum(), leaf)
    assert torch.equal(grad, expected)
    assert set(grad.unique().tolist()) == {0.0, 1.0}


def test_convolution_section_sets_threads_and_choice_and_restores_them() -> None:
    """One torch thread inside a Winograd section on one image only; oneDNN sections and batches keep the count; the
    calling thread's count and the choice come back, also after an exception."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        conv = WinogradConv2d(3, 4).eval()
        one, two = torch.rand(1, 3, 32, 32), torch.rand(2, 3, 32, 32)
        seen = []
        with torch.no_grad():
            for x, winograd in ((one, True), (two, True), (one, False)):
                with convolution_section(x, winograd=winograd):
                    seen.append((torch.get_num_threads(), torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))))
            assert seen == [(1, False), (2, False), (2, True)]  # oneDNN: nn.Conv2d's exact values
            with pytest.raises(RuntimeError, match="inside"), convolution_section(one, winograd=True):
                raise RuntimeError("inside")
            assert torch.get_num_threads() == 2
            assert not torch.equal(conv(one), F.conv2d(one, conv.weight, conv.bias, padding=1))  # Winograd again
    finally:
        torch.set_num_threads(threads)


def test_run_fastest_measures_once_per_shape_and_keeps_the_faster(monkeypatch, caplog) -> None:
    """The first inference call of a U-Net per input shape times both paths and logs them; later calls reuse the
    choice; the output is the chosen path's; training and autograd never measure."""
    import anomalib_dsr.model.unet as unet_module

    torch.manual_seed(0)
    unet = UNet(3, width=4).eval()
    one = torch.rand(1, 3, 32, 32)
    measured: list[tuple[int, ...]] = []
    original = unet_module._winograd_is_faster
    for faster in (True, False):
        unet_module._FASTEST.pop(unet, None)

        def fake(module, x, body, faster=faster):
            measured.append(tuple(x.shape))
            return faster

        monkeypatch.setattr(unet_module, "_winograd_is_faster", fake)
        with torch.no_grad():
            first, second = unet(one), unet(one)
            with convolution_section(one, winograd=faster):
                expected = unet.decoder(*unet.encoder(one))
        assert torch.equal(first, second) and torch.equal(first, expected)
    assert measured == [(1, 3, 32, 32)] * 2
    unet(one)  # autograd on: no measurement
    assert len(measured) == 2

    monkeypatch.setattr(unet_module, "_winograd_is_faster", original)
    unet_module._FASTEST.pop(unet, None)
    with caplog.at_level("INFO", logger="anomalib_dsr.model.unet"), torch.no_grad():
        unet(one)
    assert "UNet on (1, 3, 32, 32): NNPACK Winograd" in caplog.text and "oneDNN" in caplog.text
