"""The training precision switch: bf16 autocast where the device computes bf16 natively, fp32 elsewhere."""

from __future__ import annotations

import pytest
import torch

from anomalib_dsr.model.layers import precision
from anomalib_dsr.model.layers.precision import has_native_bf16, resolve_training_precision


def fake_cpu(monkeypatch: pytest.MonkeyPatch, *, amx: bool, avx512_bf16: bool, cap: str | None = None) -> None:
    """Make this CPU look like one with (or without) AMX and AVX512-BF16, oneDNN capped at ``cap``."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(precision.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "cap", "chosen"),
    [
        (True, True, None, "bf16"),  # Intel Sapphire Rapids and later
        (False, True, None, "bf16"),  # AMD EPYC Zen 4: AVX512-BF16, no AMX
        (False, False, None, "fp32"),  # AVX2 or AVX-512 without bf16: bf16 would be emulated, slower
        (True, True, "AVX2", "fp32"),  # oneDNN told not to use the bf16 instructions
        (True, True, "AVX512_CORE", "fp32"),
        (False, True, "AVX512_CORE_BF16", "bf16"),
        (True, True, "avx512_core_amx", "bf16"),
    ],
)
def test_auto_follows_the_cpu(monkeypatch, amx, avx512_bf16, cap, chosen) -> None:
    fake_cpu(monkeypatch, amx=amx, avx512_bf16=avx512_bf16, cap=cap)
    assert resolve_training_precision("auto", "cpu") == chosen
    assert resolve_training_precision("fp32", "cpu") == "fp32"  # explicit choices are kept whatever the CPU
    assert resolve_training_precision("bf16", "cpu") == "bf16"


def test_unknown_devices_and_values(monkeypatch) -> None:
    fake_cpu(monkeypatch, amx=True, avx512_bf16=True)
    assert has_native_bf16("cpu") and not has_native_bf16("mps")
    with pytest.raises(
        ValueError, match=r"training_precision must be one of \('fp32', 'bf16', 'auto'\), got 'bf16-mixed'"
    ):
        resolve_training_precision("bf16-mixed", "cpu")
