"""The U-Nets' InstanceNorm (``anomalib_dsr.model.unet.InstanceNorm2d``): as accurate as ``nn.InstanceNorm2d`` against
float64, on channels of large mean and tiny spread too, in both memory layouts and in a captured graph; the
same values and gradients; its input overwritten only when asked. The U-Nets' Winograd convolutions
(``WinogradConv2d``) and upsampling (``Upsample2x``): their faster algorithms taken only at inference, chosen by
timing, near float64 there, ``nn.Conv2d``'s and ``nn.Upsample``'s everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anomalib_dsr.model.unet import (
    InstanceNorm2d,
    MaxPool2x2,
    UNet,
    Upsample2x,
    WinogradConv2d,
    convolution_section,
)

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


@pytest.mark.parametrize("winograd", ["nnpack", "matmul"])
@pytest.mark.parametrize(("in_channels", "out_channels", "size"), [(6, 64, 128), (128, 64, 64), (512, 512, 16)])
def test_winograd_convolution_at_inference(
    in_channels: int, out_channels: int, size: int, winograd: str, force_algorithms
) -> None:
    """eval + no autograd on CPU in float32: NNPACK's Winograd in an NNPACK section, else the matrix-product one when
    chosen; within 5e-5 of the output's scale of float64 (seen: 3e-6 to 2e-5; oneDNN's direct convolution ~3e-7),
    not nn.Conv2d's values (the path is taken), each image as if alone, in either memory layout."""
    torch.manual_seed(0)
    force_algorithms("matrix-product Winograd")
    conv = WinogradConv2d(in_channels, out_channels).eval()
    x = torch.randn(3, in_channels, size, size).contiguous(memory_format=torch.channels_last)
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    with torch.no_grad(), convolution_section(x, nnpack=winograd == "nnpack"):
        fast, direct = conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)
        assert torch.equal(fast[1:2], conv(x[1:2]))  # batch = images one by one
        assert torch.equal(conv(x.contiguous()), fast)
    assert fast.shape == exact.shape
    assert (fast.double() - exact).abs().max() < 5e-5 * exact.abs().max()
    assert not torch.equal(fast, direct)


def test_matmul_winograd_on_any_size_multiple_of_4_only(force_algorithms) -> None:
    """Non-square maps and no bias are computed like float64; a side that is not a multiple of 4 gets oneDNN's
    exact values instead."""
    torch.manual_seed(0)
    force_algorithms("matrix-product Winograd")
    conv = WinogradConv2d(16, 8).eval()
    conv.bias = None
    x = torch.randn(2, 16, 20, 36)
    exact = F.conv2d(x.double(), conv.weight.double(), padding=1)
    with torch.no_grad():
        assert (conv(x).double() - exact).abs().max() < 5e-5 * exact.abs().max()
        odd = x[..., :34]
        assert torch.equal(conv(odd), F.conv2d(odd, conv.weight, padding=1))


def test_matmul_winograd_split_into_small_blocks_and_filter_groups() -> None:
    """Buffers capped far below the default (several filter groups, several row blocks per image, a last partial
    one): the same convolution, as near float64 as the unsplit one (not bit-equal: the matrix products' sizes, and
    so BLAS's summation order, differ, and Winograd's transforms magnify that to ~3e-6 of the scale)."""
    from anomalib_dsr.model.winograd import winograd_conv3x3

    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 32, 40, 24), 0.1 * torch.randn(40, 32, 3, 3), torch.randn(40)
    exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    whole = winograd_conv3x3(x, weight, bias)
    split = winograd_conv3x3(x, weight, bias, block_bytes=84_000)  # filter groups 14, 14, 12; tile rows 3, 3, 3, 1
    for result in (whole, split):
        assert (result.double() - exact).abs().max() < 5e-5 * exact.abs().max()


def test_matmul_winograd_sees_weights_written_through_data(force_algorithms) -> None:
    """Nothing of the weights is cached: a write through ``.data`` (which does not count as a change of the
    parameter) shows in the next output."""
    torch.manual_seed(0)
    force_algorithms("matrix-product Winograd")
    conv = WinogradConv2d(8, 8).eval()
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        before = conv(x)
        conv.weight.data.mul_(2)
        after = conv(x)
        exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert (after.double() - exact).abs().max() < 5e-5 * exact.abs().max()
    assert (after - before).abs().max() > 0.1 * before.abs().max()


def test_layer_times_its_algorithms_once_per_shape_and_keeps_the_fastest(monkeypatch, caplog) -> None:
    """Outside NNPACK sections the first call per layer architecture, image shape, layout and thread count times the
    algorithms offered on one image and logs their times; later calls (any batch, any layer of that architecture) take
    the fastest one's values; training and autograd never time. Tap sums are offered only to layers with at most a ninth as many filters as inputs."""
    import anomalib_dsr.model.unet as unet_module
    from anomalib_dsr.model.tap_sums import tap_sum_conv3x3
    from anomalib_dsr.model.winograd import winograd_conv3x3

    torch.manual_seed(0)
    timed: list[list[str]] = []

    def fake(candidates):
        timed.append(list(candidates))
        assert all(run().shape[0] == 1 for run in candidates.values())
        return fastest, {name: 1e-3 * (index + 1) for index, name in enumerate(candidates)}

    monkeypatch.setattr(unet_module, "_fastest", fake)
    x = torch.randn(2, 18, 16, 16)
    algorithms = {
        "oneDNN": lambda conv, x: F.conv2d(x, conv.weight, conv.bias, padding=1),
        "matrix-product Winograd": lambda conv, x: winograd_conv3x3(x, conv.weight, conv.bias),
        "tap sums": lambda conv, x: tap_sum_conv3x3(x, conv.weight, conv.bias),
    }
    for fastest, expected in algorithms.items():
        monkeypatch.setattr(unet_module, "_ALGORITHM", {})
        timed.clear()
        conv = WinogradConv2d(18, 2).eval()
        with torch.no_grad(), caplog.at_level("DEBUG", logger="anomalib_dsr.model.unet"):
            assert torch.equal(conv(x), expected(conv, x)) and torch.equal(conv(x[:1]), expected(conv, x[:1]))
            assert timed == [list(algorithms)]
            twin = WinogradConv2d(18, 2).eval()  # another layer of the same architecture: the same choice, untimed
            assert torch.equal(twin(x), expected(twin, x)) and len(timed) == 1
            conv(x.contiguous(memory_format=torch.channels_last))  # another layout: timed again
            conv(x[:, :, :8])  # another shape: timed again
            assert len(timed) == 3
        conv(x)  # autograd on: never timed
        conv.train()
        with torch.no_grad():
            conv(torch.randn(1, 18, 12, 12))
        assert len(timed) == 3
    assert "oneDNN 1.00 ms, matrix-product Winograd 2.00 ms, tap sums 3.00 ms per image: using tap sums" in caplog.text
    timed.clear()
    fastest = "oneDNN"
    monkeypatch.setattr(unet_module, "_ALGORITHM", {})
    with torch.no_grad():
        WinogradConv2d(18, 3).eval()(x)
        WinogradConv2d(18, 2).eval()(x[..., :10])  # a side not a multiple of 4: no Winograd
    assert timed == [["oneDNN", "matrix-product Winograd"], ["oneDNN", "tap sums"]]


@pytest.mark.parametrize(("filters", "size"), [(2, 32), (3, 1), (1, 7)])
def test_tap_sums_compute_the_convolution(filters: int, size: int, force_algorithms) -> None:
    """The tap sums, when chosen, are the 3x3 convolution within float32 rounding of float64 (seen: 2e-7 of the
    scale, oneDNN's level), with and without bias, on maps down to 1x1 and in either layout."""
    torch.manual_seed(0)
    force_algorithms("tap sums")
    conv = WinogradConv2d(9 * filters + 1, filters).eval()
    x = torch.randn(2, 9 * filters + 1, size, size + 4)
    with torch.no_grad():
        for bias in (conv.bias, None):
            conv.bias = bias
            exact = F.conv2d(x.double(), conv.weight.double(), None if bias is None else bias.double(), padding=1)
            fast = conv(x)
            assert fast.shape == exact.shape
            assert (fast.double() - exact).abs().max() < 2e-6 * exact.abs().max()
            assert torch.equal(conv(x.contiguous(memory_format=torch.channels_last)), fast)


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
    assert torch.equal(up(x), torch_kernel)  # autograd on
    force_algorithms("matrix products")
    with torch.no_grad():
        fast = up(x)
        assert torch.equal(up.train()(x), torch_kernel)
    assert fast.shape == exact.shape
    assert (fast.double() - exact).abs().max() < 1e-6 * exact.abs().max()
    if height > 1:
        assert not torch.equal(fast, torch_kernel)


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


def test_convolution_section_sets_threads_and_choice_and_restores_them(force_algorithms) -> None:
    """One torch thread inside an NNPACK section on one image only; other sections and batches keep the count; the
    calling thread's count and the choice come back, also after an exception."""
    force_algorithms()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        conv = WinogradConv2d(3, 4).eval()
        one, two = torch.rand(1, 3, 32, 32), torch.rand(2, 3, 32, 32)
        seen = []
        with torch.no_grad():
            for x, nnpack in ((one, True), (two, True), (one, False)):
                with convolution_section(x, nnpack=nnpack):
                    direct = torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
                    seen.append((torch.get_num_threads(), direct))
            assert seen == [(1, False), (2, False), (2, True)]  # oneDNN: nn.Conv2d's exact values
            with pytest.raises(RuntimeError, match="inside"), convolution_section(one, nnpack=True):
                assert not torch.equal(conv(one), F.conv2d(one, conv.weight, conv.bias, padding=1))  # NNPACK
                raise RuntimeError("inside")
            assert torch.get_num_threads() == 2
            assert torch.equal(conv(one), F.conv2d(one, conv.weight, conv.bias, padding=1))  # the layer's own again
    finally:
        torch.set_num_threads(threads)


def test_run_fastest_measures_once_per_shape_and_keeps_the_faster(monkeypatch, caplog) -> None:
    """The first inference call of a U-Net architecture per input shape times an NNPACK section against the layers'
    own choices and logs both; later calls, of any U-Net of that architecture, reuse the choice; the output is the
    chosen section's; training and autograd never measure."""
    import anomalib_dsr.model.unet as unet_module

    torch.manual_seed(0)
    unet = UNet(3, width=4).eval()
    one = torch.rand(1, 3, 32, 32)
    measured: list[tuple[int, ...]] = []
    original = unet_module._nnpack_is_faster
    for faster in (True, False):
        monkeypatch.setattr(unet_module, "_FASTEST", {})

        def fake(module, x, body, faster=faster):
            measured.append(tuple(x.shape))
            return faster

        monkeypatch.setattr(unet_module, "_nnpack_is_faster", fake)
        with torch.no_grad():
            first, second = unet(one), unet(one)
            with convolution_section(one, nnpack=faster):
                expected = unet.decoder(*unet.encoder(one))
        assert torch.equal(first, second) and torch.equal(first, expected)
    assert measured == [(1, 3, 32, 32)] * 2
    unet(one)  # autograd on: no measurement
    assert len(measured) == 2

    twin = UNet(3, width=4).eval()  # the same architecture: the same choice, not measured again
    with torch.no_grad():
        twin(one)
    assert len(measured) == 2

    monkeypatch.setattr(unet_module, "_nnpack_is_faster", original)
    monkeypatch.setattr(unet_module, "_FASTEST", {})
    with caplog.at_level("INFO", logger="anomalib_dsr.model.unet"), torch.no_grad():
        unet(one)
    assert "UNet on (1, 3, 32, 32): NNPACK Winograd" in caplog.text and "per-layer choice" in caplog.text
