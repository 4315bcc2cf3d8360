"""Accuracy guard for mixed precision: does training DSR with ``precision="bf16-mixed"`` cost accuracy?

Runs the offline demo (``anomalib_dsr.workflows.demo.run_demo``, the same code as ``make demo``) twice with the same
seed and the same step budget: once in fp32 (Lightning's ``"32-true"``) and once with ``"bf16-mixed"``. In
both runs the demo builds the same dataset and uses the general VQ-VAE shipped with the package (phase 1, fp32), so only
DSR's training (phases 2 and 3) and its test pass differ in precision. It prints image AUROC and pixel AP (anomalib's
``image_AUROC`` and ``pixel_AUPR``) of both runs and their differences in points, and says PASS if both differences are
within 1 point (0.01), FAIL otherwise (exit code 1).

Usage (from the repository root):

    .venv/bin/python benchmarks/bf16_accuracy.py                          # demo budgets (DemoSettings)
    .venv/bin/python benchmarks/bf16_accuracy.py --steps 60 --vq-steps 60 # a quick check of the script
    .venv/bin/python benchmarks/bf16_accuracy.py --output bf16_check      # keep both runs' outputs

bf16 on CPU: oneDNN runs bf16 convolutions natively only on CPUs with AVX512-BF16 or AMX. Elsewhere (e.g.
AMD EPYC without them) bf16 autocast is emulated and many times slower than fp32, so the bf16 run takes far
longer than the fp32 one; the script is mainly meant for GPUs with bf16 and for AMX CPUs. The numbers it
compares do not depend on that, only the wall time does.

Resolution: the demo's test split has 16 good and 24 defective images, so one good/defective pair changing
order moves image AUROC by 1/384 = 0.26 point; with short budgets (a barely trained model) the two runs'
trajectories drift apart and the image AUROC difference can exceed 1 point on this small split.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from anomalib_dsr.workflows.demo import DemoSettings, run_demo

PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
METRICS = {"image_AUROC": "image AUROC", "pixel_AUPR": "pixel AP"}
TOLERANCE = 0.01  # 1 point


def parse_args() -> argparse.Namespace:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=defaults.dsr_steps, help="DSR training steps (default: demo's)")
    parser.add_argument("--output", type=Path, help="working folder, one sub-folder per precision (default: temporary)")
    return parser.parse_args()


def compare(output: Path, settings: DemoSettings) -> bool:
    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for name, precision in PRECISIONS.items():
        print(f"\n=== {name} run (precision={precision!r}) ===")
        start = time.perf_counter()
        metrics = run_demo(output / name, settings=settings, progress=False, precision=precision)
        seconds[name] = time.perf_counter() - start
        results[name] = {key: float(metrics[key]) for key in METRICS}

    print(
        f"\nbf16 accuracy guard: {settings.dsr_steps} DSR steps, seed {settings.seed}, "
        "the shipped general VQ-VAE in both runs"
    )
    print(f"{'':12} {'fp32':>7} {'bf16':>7} {'bf16 - fp32':>14}")
    ok = True
    for key, label in METRICS.items():
        fp32, bf16 = results["fp32"][key], results["bf16"][key]
        diff = bf16 - fp32
        ok &= abs(diff) <= TOLERANCE
        print(f"{label:12} {fp32:7.4f} {bf16:7.4f} {100 * diff:+10.2f} pts")
    print(f"wall time    {seconds['fp32']:6.0f}s {seconds['bf16']:6.0f}s")
    verdict = "within" if ok else "not both within"
    print(f"{'PASS' if ok else 'FAIL'}: differences {verdict} {100 * TOLERANCE:.0f} point ({TOLERANCE})")
    return ok


def main() -> int:
    args = parse_args()
    settings = replace(DemoSettings(), dsr_steps=args.steps)
    if args.output is not None:
        return 0 if compare(args.output, settings) else 1
    with tempfile.TemporaryDirectory(prefix="dsr_bf16_") as tmp:
        return 0 if compare(Path(tmp), settings) else 1


if __name__ == "__main__":
    sys.exit(main())
