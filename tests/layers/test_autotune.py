"""The public switch of the timed algorithms (``fixed_algorithms``, ``ANOMALIB_DSR_ALGORITHMS``): fixed choices are
taken untimed, the context manager wins over the variable, unknown names are refused with the valid ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomalib_dsr.model.layers import ENV_VARIABLE, TimedConv3x3, autotune, fixed_algorithms
from anomalib_dsr.model.layers.autotune import convolution_section
from anomalib_dsr.model.layers.tap_sums import tap_sum_conv3x3
from anomalib_dsr.model.unet import UNet


@pytest.fixture
def never_timed(monkeypatch):
    """Fail any timing; and start from empty caches, so a cached choice cannot hide one."""
    monkeypatch.setattr(autotune, "_ALGORITHM", {})
    monkeypatch.setattr(autotune, "_FASTEST", {})
    monkeypatch.setattr(autotune, "_fastest", lambda candidates: pytest.fail(f"timed {sorted(candidates)}"))
    monkeypatch.delenv(ENV_VARIABLE, raising=False)


def few_filter_layer() -> tuple[TimedConv3x3, torch.Tensor]:
    """A 19→2 layer (offers oneDNN, matrix-product Winograd and tap sums) and an input with sides multiple of 4."""
    torch.manual_seed(0)
    return TimedConv3x3(19, 2).eval(), torch.randn(2, 19, 8, 12)


def test_fixed_algorithms_take_the_layers_own_untimed(never_timed) -> None:
    conv, x = few_filter_layer()
    with torch.no_grad(), fixed_algorithms():
        # exact by construction: the same oneDNN kernel on the same input
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
        assert autotune.fixed() == autotune.Fixed((), False)
    assert autotune.fixed() is None


def test_environment_variable_fixes_the_algorithms(never_timed, monkeypatch) -> None:
    conv, x = few_filter_layer()
    monkeypatch.setenv(ENV_VARIABLE, "tap sums, matrix products")
    with torch.no_grad():
        # exact by construction: the chosen function itself on the same input
        assert torch.equal(conv(x), tap_sum_conv3x3(x, weight=conv.weight, bias=conv.bias))
        with fixed_algorithms("own"):  # the context manager wins over the variable
            assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    monkeypatch.setenv(ENV_VARIABLE, "NNPACK")
    assert autotune.fixed() == autotune.Fixed((), True)


def test_fixed_nnpack_runs_modules_in_nnpack_sections(never_timed) -> None:
    conv, x = few_filter_layer()
    seen = []

    def body(images: torch.Tensor) -> torch.Tensor:
        seen.append(autotune.NNPACK_SECTION.get())
        return images

    with torch.no_grad():
        for nnpack in (True, False):
            with fixed_algorithms(nnpack=nnpack):
                autotune.run_fastest(conv, x, body)
    assert seen == [autotune._nnpack_ready(), False]  # without NNPACK built in, never a section


@pytest.mark.parametrize("source", ["context", "environment"])
def test_unknown_algorithm_names_are_refused_with_the_valid_ones(source: str, monkeypatch) -> None:
    conv, x = few_filter_layer()
    with pytest.raises(ValueError, match=r"Unknown algorithm name\(s\) \['winograd'\].*valid names: own, oneDNN"):
        if source == "context":
            with fixed_algorithms("winograd"):
                pass
        else:
            monkeypatch.setenv(ENV_VARIABLE, "winograd")
            with torch.no_grad():
                conv(x)


def test_convolution_section_sets_threads_and_choice_and_restores_them(force_algorithms) -> None:
    """One torch thread inside an NNPACK section on one image only; other sections and batches keep the count; the
    calling thread's count and the choice come back, also after an exception."""
    force_algorithms()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        conv = TimedConv3x3(3, 4).eval()
        one, two = torch.rand(1, 3, 32, 32), torch.rand(2, 3, 32, 32)
        seen = []
        with torch.no_grad():
            for x, nnpack in ((one, True), (two, True), (one, False)):
                with convolution_section(x, nnpack=nnpack):
                    # Outside NNPACK exact by construction: the layer's own algorithm is this very call, in the same
                    # section (same threads). NNPACK's Winograd rounds differently (~1e-5 of the scale): never equal.
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
    torch.manual_seed(0)
    unet = UNet(3, width=4).eval()
    one = torch.rand(1, 3, 32, 32)
    measured: list[tuple[int, ...]] = []
    original = autotune._nnpack_is_faster
    for faster in (True, False):
        monkeypatch.setattr(autotune, "_FASTEST", {})

        def fake(module, x, body, faster=faster):
            measured.append(tuple(x.shape))
            return faster

        monkeypatch.setattr(autotune, "_nnpack_is_faster", fake)
        with torch.no_grad():
            first, second = unet(one), unet(one)
            with convolution_section(one, nnpack=faster):
                expected = unet.decoder(*unet.encoder(one))
        # exact by construction: the same section and the per-layer choices remembered from the first call, so the
        # same kernels on the same input with the same threads, three times
        assert torch.equal(first, second) and torch.equal(first, expected)
    assert measured == [(1, 3, 32, 32)] * 2
    unet(one)  # autograd on: no measurement
    assert len(measured) == 2

    twin = UNet(3, width=4).eval()  # the same architecture: the same choice, not measured again
    with torch.no_grad():
        twin(one)
    assert len(measured) == 2

    monkeypatch.setattr(autotune, "_nnpack_is_faster", original)
    monkeypatch.setattr(autotune, "_FASTEST", {})
    with caplog.at_level("INFO", logger="anomalib_dsr.model.layers.autotune"), torch.no_grad():
        unet(one)
    assert "UNet on (1, 3, 32, 32): NNPACK Winograd" in caplog.text and "per-layer choice" in caplog.text
