"""The timed 3x3 convolution (``TimedConv3x3``) and its kernels (NNPACK's and the matrix-product Winograd, tap
sums): their faster algorithms taken only at inference, chosen by timing, near float64 there, ``nn.Conv2d``'s
everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anomalib_dsr.model.layers import autotune
from anomalib_dsr.model.layers.autotune import convolution_section
from anomalib_dsr.model.layers.timed_conv import TimedConv3x3


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
    conv = TimedConv3x3(in_channels, out_channels).eval()
    x = torch.randn(3, in_channels, size, size).contiguous(memory_format=torch.channels_last)
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    with torch.no_grad(), convolution_section(x, nnpack=winograd == "nnpack"):
        fast, direct = conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)
        one, nchw = conv(x[1:2]), conv(x.contiguous())  # an image alone; the other layout
    assert fast.shape == exact.shape
    # Each against float64, not the batch bit for bit: one image and the NCHW copy are other matrix products (other
    # blockings, so another summation order on some CPUs). 5e-5 of the scale is the docstring's bound; an image
    # mixed with another, or a tile misplaced, is off by the output's whole scale.
    for result, reference in ((fast, exact), (one, exact[1:2]), (nchw, exact)):
        assert (result.double() - reference).abs().max() < 5e-5 * reference.abs().max()
    assert not torch.equal(fast, direct)  # Winograd's rounding (~1e-5 of the scale), not oneDNN's: the path is taken


def test_matmul_winograd_on_any_size_multiple_of_4_only(force_algorithms) -> None:
    """Non-square maps and no bias are computed like float64; a side that is not a multiple of 4 gets oneDNN's
    exact values instead."""
    torch.manual_seed(0)
    force_algorithms("matrix-product Winograd")
    conv = TimedConv3x3(16, 8).eval()
    conv.bias = None
    x = torch.randn(2, 16, 20, 36)
    exact = F.conv2d(x.double(), conv.weight.double(), padding=1)
    with torch.no_grad():
        assert (conv(x).double() - exact).abs().max() < 5e-5 * exact.abs().max()
        odd = x[..., :34]
        # exact by construction: oneDNN is the only algorithm offered, so the layer runs this very call
        assert torch.equal(conv(odd), F.conv2d(odd, conv.weight, padding=1))


def test_matmul_winograd_split_into_small_blocks_and_filter_groups() -> None:
    """Buffers capped far below the default (several filter groups, several row blocks per image, a last partial
    one): the same convolution, as near float64 as the unsplit one (not bit-equal: the matrix products' sizes, and
    so BLAS's summation order, differ, and Winograd's transforms magnify that to ~3e-6 of the scale)."""
    from anomalib_dsr.model.layers.winograd import winograd_conv3x3

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
    conv = TimedConv3x3(8, 8).eval()
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
    the fastest one's values; training and autograd never time. Tap sums are offered only to layers with at most a ninth
    as many filters as inputs."""
    from anomalib_dsr.model.layers.tap_sums import tap_sum_conv3x3
    from anomalib_dsr.model.layers.winograd import winograd_conv3x3

    torch.manual_seed(0)
    timed: list[list[str]] = []

    def fake(candidates):
        timed.append(list(candidates))
        assert all(run().shape[0] == 1 for run in candidates.values())
        return fastest, {name: 1e-3 * (index + 1) for index, name in enumerate(candidates)}

    monkeypatch.setattr(autotune, "_fastest", fake)
    x = torch.randn(2, 18, 16, 16)
    algorithms = {
        "oneDNN": lambda conv, x: F.conv2d(x, conv.weight, conv.bias, padding=1),
        "matrix-product Winograd": lambda conv, x: winograd_conv3x3(x, conv.weight, conv.bias),
        "tap sums": lambda conv, x: tap_sum_conv3x3(x, conv.weight, conv.bias),
    }
    for fastest, expected in algorithms.items():
        monkeypatch.setattr(autotune, "_ALGORITHM", {})
        timed.clear()
        conv = TimedConv3x3(18, 2).eval()
        with torch.no_grad(), caplog.at_level("DEBUG", logger="anomalib_dsr.model.layers.autotune"):
            # exact by construction: the layer calls the very function it chose, on the same tensor, same threads
            assert torch.equal(conv(x), expected(conv, x)) and torch.equal(conv(x[:1]), expected(conv, x[:1]))
            assert timed == [list(algorithms)]
            twin = TimedConv3x3(18, 2).eval()  # another layer of the same architecture: the same choice, untimed
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
    monkeypatch.setattr(autotune, "_ALGORITHM", {})
    with torch.no_grad():
        TimedConv3x3(18, 3).eval()(x)
        TimedConv3x3(18, 2).eval()(x[..., :10])  # a side not a multiple of 4: no Winograd
    assert timed == [["oneDNN", "matrix-product Winograd"], ["oneDNN", "tap sums"]]


@pytest.mark.parametrize(("filters", "size"), [(2, 32), (3, 1), (1, 7)])
def test_tap_sums_compute_the_convolution(filters: int, size: int, force_algorithms) -> None:
    """The tap sums, when chosen, are the 3x3 convolution within float32 rounding of float64 (seen: 2e-7 of the
    scale, oneDNN's level), with and without bias, on maps down to 1x1 and in either layout."""
    torch.manual_seed(0)
    force_algorithms("tap sums")
    conv = TimedConv3x3(9 * filters + 1, filters).eval()
    x = torch.randn(2, 9 * filters + 1, size, size + 4)
    with torch.no_grad():
        for bias in (conv.bias, None):
            conv.bias = bias
            exact = F.conv2d(x.double(), conv.weight.double(), None if bias is None else bias.double(), padding=1)
            # Each layout against float64, not one against the other: channels_last makes the matrix product read
            # its input transposed, another kernel and summation order. 2e-6 of the scale ≈ eps32 (1.2e-7) x
            # √(fan-in, up to 9·28 = 252): the usual growth of rounding in such a sum, 10x what is seen (2e-7).
            # A tap added at the wrong offset, or a bias dropped, is off by a good part of the scale.
            for layout in (torch.contiguous_format, torch.channels_last):
                fast = conv(x.contiguous(memory_format=layout))
                assert fast.shape == exact.shape
                assert (fast.double() - exact).abs().max() < 2e-6 * exact.abs().max(), layout


def test_winograd_convolution_is_nn_conv2d_elsewhere() -> None:
    """Training, autograd, autocast and graph capture (ONNX/OpenVINO export) get nn.Conv2d's exact values; the
    weights are nn.Conv2d's, under the same keys."""
    torch.manual_seed(0)
    conv = TimedConv3x3(16, 8)
    assert conv.state_dict().keys() == nn.Conv2d(16, 8, 3, padding=1).state_dict().keys()
    x = torch.randn(2, 16, 32, 32)
    direct = F.conv2d(x, conv.weight, conv.bias, padding=1)
    # exact by construction: each is this very aten convolution (oneDNN's, whatever the grad mode) on the same input
    assert torch.equal(conv.train()(x), direct)  # training
    assert torch.equal(conv.eval()(x), direct)  # autograd on
    with torch.no_grad():
        assert torch.equal(torch.export.export(conv, (x,)).module()(x), direct)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv(x).dtype == torch.bfloat16
