"""Speed of ``anomalib_dsr.Dsr`` against anomalib's built-in DSR, side by side in one run.

Both models have the paper's architecture and widths; they get the same random input batch, the same batch
size and, for the output check, the same weights. Measured, each as the median of ``--repeats`` runs:

- phase-2 and phase-3 training steps: the full step each model's Lightning module performs (simulated
  anomalies, forward, loss, backward, optimiser step), driven by a Lightning ``Trainer`` on a repeated batch
  and timed from ``on_train_batch_start`` to ``on_train_batch_end``; bf16 runs use
  ``Trainer(precision="bf16-mixed")``, as a user would;
- inference latency of the torch model (``model.model(images)``, eval mode, ``torch.inference_mode``) at
  batch 1 and at ``--batch-size``; bf16 under ``torch.autocast``;
- peak memory of one training step of each phase and of one inference batch, each in its own fresh process:
  peak resident set size (``VmHWM``) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

Training timings alternate between the models in ``--rounds`` rounds (a short ``fit`` of each model per
round) and inference timings alternate call by call, so that a busy machine slows both alike. Every figure
is printed with its ratio against anomalib's (speed-up = anomalib's time / ours; memory = ours / anomalib's).

anomalib's DSR wants its general VQ-VAE at ``<user cache>/anomalib/pre_trained/dsr/vq_model_pretrained_128_4096.pckl``
and downloads it otherwise: this script points ``XDG_CACHE_HOME`` at a temporary folder before anomalib is
imported and writes a randomly initialised VQ-VAE there, in the original layout; ours reads the same file.

Usage (from the repository root):

    .venv/bin/python benchmarks/speed.py              # 256x256, batch 8, fp32 and bf16 (a long run on CPU)
    .venv/bin/python benchmarks/speed.py --quick      # 64x64, batch 2: checks that everything works (~2 min)
    .venv/bin/python benchmarks/speed.py --precision fp32 --measures train2,infer --json speed.json

bf16 on CPU: oneDNN runs bf16 convolutions natively only on CPUs with AVX512-BF16 or AMX; elsewhere they are
emulated and many times slower than fp32, so bf16 is skipped there unless ``--force-bf16`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from common import cpu_name

VQ_FILE_NAME = "vq_model_pretrained_128_4096.pckl"
OURS, OURS_CL, ANOMALIB = "ours", "ours+channels_last", "anomalib"
MEASURES = ("train2", "train3", "infer", "memory")
LABELS = {
    "train2": "phase-2 training step",
    "train3": "phase-3 training step",
    "infer1": "inference, batch 1",
    "inferB": "inference, batch {b}",
    "mem_train2": "peak memory, phase-2 step",
    "mem_train3": "peak memory, phase-3 step",
    "mem_infer": "peak memory, inference batch {b}",
}


# ------------------------------------------------------------------------------------------------ set-up
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=8, help="training and inference batch size (default 8)")
    parser.add_argument("--image-size", type=int, default=256, help="square image side, a multiple of 32 (default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per figure (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps/calls before timing, per fit (default 1)")
    parser.add_argument("--rounds", type=int, default=2, help="training fits per model, alternating models (default 2)")
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto: cpu, and cuda when a GPU is present")
    parser.add_argument(
        "--measures", default=",".join(MEASURES), help=f"comma-separated subset of {','.join(MEASURES)}"
    )
    parser.add_argument(
        "--channels-last",
        choices=("off", "on", "both"),
        default="both",
        help="time ours in the default layout (off), with Dsr(channels_last=True) (on), or both (default)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 on CPUs without native bf16 too")
    parser.add_argument(
        "--quick", action="store_true", help="64x64, batch 2, 2 repeats, 1 round: checks the script works"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.batch_size, args.repeats, args.warmup, args.rounds = 64, 2, 2, 1, 1
    args.precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    args.measure_set = {m.strip() for m in args.measures.split(",") if m.strip()}
    if bad := [p for p in args.precisions if p not in ("fp32", "bf16")]:
        parser.error(f"unknown precision(s) {bad}: use fp32 and/or bf16")
    if bad := sorted(args.measure_set - set(MEASURES)):
        parser.error(f"unknown measure(s) {bad}: use {','.join(MEASURES)}")
    if args.image_size % 32 or args.image_size <= 32:
        parser.error("--image-size must be a multiple of 32 larger than 32")
    return args


def prepare_cache() -> Path:
    """Point anomalib's cache at a temporary folder (before anomalib is imported) and return the VQ file there.

    The parent process creates the folder; memory workers inherit ``XDG_CACHE_HOME`` and reuse it.
    """
    if "DSR_SPEED_CACHE" not in os.environ:
        os.environ["DSR_SPEED_CACHE"] = tempfile.mkdtemp(prefix="dsr_speed_cache_")
    os.environ["XDG_CACHE_HOME"] = os.environ["DSR_SPEED_CACHE"]
    return Path(os.environ["XDG_CACHE_HOME"]) / "anomalib" / "pre_trained" / "dsr" / VQ_FILE_NAME


def write_random_vq(path: Path, seed: int) -> None:
    """A randomly initialised general VQ-VAE (paper widths) as a plain state_dict in the original layout."""
    import torch

    from anomalib_dsr.model.original_format import VQ_FORMAT, original_state
    from anomalib_dsr.model.vq_vae import GeneralVQVAE

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(original_state(GeneralVQVAE(), VQ_FORMAT), path)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "anomalib", "anomalib_dsr"):
        logging.getLogger(name).setLevel(logging.ERROR)


def native_bf16_cpu() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # noqa: SLF001
    except (AttributeError, RuntimeError):
        return False


# ------------------------------------------------------------------------------------------------ models
def build_anomalib():
    from anomalib.models.image.dsr import Dsr as AnomalibDsr

    return AnomalibDsr(pre_processor=False, post_processor=False, evaluator=False, visualizer=False)


def build_ours(vq_file: Path, size: int, channels_last: bool):
    from anomalib_dsr import Dsr

    return Dsr(
        image_size=size,
        vq_weights=vq_file,
        channels_last=channels_last,
        pre_processor=False,
        post_processor=False,
        evaluator=False,
        visualizer=False,
    )


def build(name: str, vq_file: Path, size: int):
    return build_anomalib() if name == ANOMALIB else build_ours(vq_file, size, channels_last=name == OURS_CL)


def copy_weights(anomalib_model, ours) -> None:
    """Give ours anomalib's (random) trainable weights: both follow the authors' layout module by module."""
    from anomalib_dsr.model.original_format import MODULE_FORMATS, load_original_state

    theirs = {
        "restriction_hi": anomalib_model.model.subspace_restriction_module_hi,
        "restriction_lo": anomalib_model.model.subspace_restriction_module_lo,
        "object_decoder": anomalib_model.model.image_reconstruction_network,
        "anomaly_detection": anomalib_model.model.anomaly_detection_module,
        "upsampling": anomalib_model.model.upsampling_module,
    }
    for file_format in MODULE_FORMATS:
        state = theirs[file_format.attribute].state_dict()
        load_original_state(getattr(ours.model, file_format.attribute), state, file_format, Path("anomalib"))


def load_vq(model, vq_file: Path, device) -> None:
    """Load the VQ file the way each model does when training starts (for inference without a fit)."""
    if hasattr(model.model, "load_pretrained_discrete_model_weights"):
        model.model.load_pretrained_discrete_model_weights(vq_file, device)
    else:
        model.load_vq_weights()


def input_batch(batch_size: int, size: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, size, size, generator=generator)


# ------------------------------------------------------------------------------------------------ timing
def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_callbacks(device, phase: int):
    from lightning.pytorch.callbacks import Callback

    class ForcePhase(Callback):
        """Both models switch phase by their own schedule; pin the phase under test instead."""

        def on_train_start(self, trainer, pl_module) -> None:
            if hasattr(pl_module, "second_phase"):  # anomalib: phase 3 once current_epoch >= second_phase
                pl_module.second_phase = 10**9 if phase == 2 else 0

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[Any] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            synchronize(device)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            synchronize(device)
            self.times.append(time.perf_counter() - self.start)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(loss.detach())

    return ForcePhase(), StepTimer()


def fit_steps(model, phase: int, steps: int, precision: str, device, images, seed: int):
    """``steps`` training steps of ``phase`` on the same batch; returns the step times and losses."""
    import lightning.pytorch as pl
    import torch
    from anomalib.data import ImageBatch
    from torch.utils.data import DataLoader

    class RepeatedBatch(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            batch = ImageBatch(image=images, gt_label=torch.zeros(images.shape[0], dtype=torch.bool))
            return DataLoader([batch] * steps, batch_size=None, collate_fn=lambda item: item)

    if hasattr(model, "phase2_steps"):  # ours: phase 3 from global step phase2_steps on
        model.phase2_steps = 10**9 if phase == 2 else 0
    force_phase, timer = make_callbacks(device, phase)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        max_steps=steps,
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[force_phase, timer],
    )
    torch.manual_seed(seed)
    model.train()  # the inference check leaves the torch models in eval mode
    trainer.fit(model, datamodule=RepeatedBatch())
    return timer.times, [float(loss) for loss in timer.losses]


def inference_fn(model, precision: str, device):
    import torch

    torch_model = model.model.eval()

    def run(images):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return torch_model(images)

    return run


def time_inference(functions: dict, images, repeats: int, warmup: int, device) -> dict[str, list[float]]:
    """Alternate the models call by call (rotating who goes first), ``repeats`` timed calls each."""
    for _ in range(warmup):
        for run in functions.values():
            run(images)
    names = list(functions)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            functions[name](images)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def check_outputs(models: dict, vq_file: Path, size: int, precision: str, device, seed: int) -> dict[str, Any]:
    """Same weights, same picture: ours on RGB must give what anomalib's gives on the same picture as BGR
    (anomalib's DSR feeds the VQ-VAE the input as it is, ours flips RGB to BGR first)."""
    import torch

    anomalib_model = models[ANOMALIB]
    images = input_batch(2, size, seed + 1).to(device)
    reference = inference_fn(anomalib_model, precision, device)(images.flip(1))
    report: dict[str, Any] = {}
    for name, model in models.items():
        if name == ANOMALIB:
            continue
        out = inference_fn(model, precision, device)(images)
        same_kind = (
            out.pred_score.shape == reference.pred_score.shape and out.anomaly_map.shape == reference.anomaly_map.shape
        )
        report[name] = {
            "same_shapes": bool(same_kind),
            "max_abs_diff_pred_score": float((out.pred_score.float() - reference.pred_score.float()).abs().max()),
            "max_abs_diff_anomaly_map": float((out.anomaly_map.float() - reference.anomaly_map.float()).abs().max()),
            "finite": bool(torch.isfinite(out.anomaly_map).all() and torch.isfinite(out.pred_score).all()),
        }
    return report


# ------------------------------------------------------------------------------------------------ memory
def memory_worker(spec: dict[str, Any]) -> dict[str, float]:
    """Run in a fresh process: one model, one measurement; returns peak memory in MiB."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    vq_file = Path(spec["vq"])
    model = build(spec["model"], vq_file, spec["size"])
    images = input_batch(spec["batch"], spec["size"], spec["seed"])
    base = current_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if spec["measure"] == "infer":
        model = model.to(device)
        load_vq(model, vq_file, device)
        run = inference_fn(model, spec["precision"], device)
        images = images.to(device)
        base = current_rss_mib()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            run(images)
    else:
        fit_steps(model, 2 if spec["measure"] == "train2" else 3, 2, spec["precision"], device, images, spec["seed"])
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
    out = {"peak_rss_mib": proc_status_mib("VmHWM"), "base_rss_mib": base}
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def proc_status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    if field == "VmHWM":  # not Linux: ru_maxrss is in KiB on Linux and the BSDs, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024
    return float("nan")


def current_rss_mib() -> float:
    return proc_status_mib("VmRSS")


def measure_memory(name: str, measure: str, precision: str, device, args, vq_file: Path) -> dict[str, float]:
    spec = {
        "model": name,
        "measure": measure,
        "precision": precision,
        "device": device.type,
        "batch": args.batch_size,
        "size": args.image_size,
        "seed": args.seed,
        "vq": str(vq_file),
        "threads": args.threads,
    }
    result = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        msg = f"memory worker failed for {name} {measure} {precision}:\n{tail}"
        raise RuntimeError(msg)
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------ report
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(rows: list[tuple[str, str, dict[str, float], str]], variants: list[str]) -> None:
    """rows: (label, unit, {model: value}, kind) with kind "time" (speed-up = anomalib / ours) or "memory"."""
    ours = [v for v in variants if v != ANOMALIB]
    header = ["measure", "unit", *ours, ANOMALIB, *[f"{v} vs anomalib" for v in ours]]
    table = [header]
    for label, unit, values, kind in rows:
        ref = values.get(ANOMALIB, float("nan"))
        cells = [label, unit, *[f"{values.get(v, float('nan')):.3f}" for v in ours], f"{ref:.3f}"]
        for v in ours:
            value = values.get(v, float("nan"))
            if kind == "time":
                cells.append(f"{ref / value:.2f}x faster" if value == value and ref == ref else "n/a")
            else:
                cells.append(f"{value / ref:.2f}x the memory" if value == value and ref == ref else "n/a")
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if i == 0:
            print("  " + "-+-".join("-" * width for width in widths))


def print_bf16_against_fp32(results: dict[str, Any], device_type: str, variants: list[str]) -> None:
    """Where both precisions ran: each time of ours in bf16 against anomalib's in fp32 (the speed a user gains by
    switching both the implementation and the precision)."""
    fp32, bf16 = results.get(f"{device_type}/fp32", {}), results.get(f"{device_type}/bf16", {})
    if "table" not in fp32 or "table" not in bf16:
        return
    baseline = {row["measure"]: row["values"][ANOMALIB] for row in fp32["table"] if row["kind"] == "time"}
    rows = [
        (
            row["measure"],
            "s",
            {**{v: row["values"][v] for v in variants if v != ANOMALIB}, ANOMALIB: baseline[row["measure"]]},
            "time",
        )
        for row in bf16["table"]
        if row["measure"] in baseline
    ]
    print(f"\n  Ours in bf16 against anomalib's in fp32, {device_type} (medians of the two tables above):")
    print_table(rows, variants)


def run_device(device, args, vq_file: Path, variants: list[str], results: dict[str, Any]) -> None:
    import torch

    for precision in args.precisions:
        key = f"{device.type}/{precision}"
        print(
            f"\n=== {device.type}, {precision}{' (bf16-mixed autocast)' if precision == 'bf16' else ''} ===", flush=True
        )
        if precision == "bf16" and device.type == "cpu" and not native_bf16_cpu() and not args.force_bf16:
            note = (
                "skipped: this CPU has no native bf16 (no AVX512-BF16/AMX), so oneDNN emulates bf16 convolutions, "
                "many times slower than fp32 (pass --force-bf16 to measure anyway)"
            )
            print("  " + note)
            results[key] = {"skipped": note}
            continue
        entry: dict[str, Any] = {"times_s": {}, "memory_mib": {}, "losses": {}}
        results[key] = entry
        rows: list[tuple[str, str, dict[str, float], str]] = []

        # Fresh models with identical weights: anomalib's random init, copied into ours.
        torch.manual_seed(args.seed)
        models = {
            name: build(name, vq_file, args.image_size) for name in [ANOMALIB, *[v for v in variants if v != ANOMALIB]]
        }
        for name, model in models.items():
            if name != ANOMALIB:
                copy_weights(models[ANOMALIB], model)
        for model in models.values():
            model.to(device)
            load_vq(model, vq_file, device)
        check = check_outputs(models, vq_file, args.image_size, precision, device, args.seed)
        entry["output_check"] = check
        for name, found in check.items():
            print(
                f"  output check, {name} vs anomalib (same weights, same picture): shapes "
                f"{'match' if found['same_shapes'] else 'DIFFER'}, "
                f"max |diff| pred_score {found['max_abs_diff_pred_score']:.2e}, "
                f"anomaly_map {found['max_abs_diff_anomaly_map']:.2e}{'' if found['finite'] else ', NOT FINITE'}",
                flush=True,
            )

        images = input_batch(args.batch_size, args.image_size, args.seed)
        for phase in (2, 3):
            measure = f"train{phase}"
            if measure not in args.measure_set:
                continue
            times: dict[str, list[float]] = {name: [] for name in models}
            losses: dict[str, list[float]] = {name: [] for name in models}
            per_round = -(-args.repeats // args.rounds)
            for r in range(args.rounds):
                order = list(models)[r % len(models) :] + list(models)[: r % len(models)]
                for name in order:
                    step_times, step_losses = fit_steps(
                        models[name], phase, args.warmup + per_round, precision, device, images, args.seed + r
                    )
                    times[name] += step_times[args.warmup :]
                    losses[name] += step_losses
                    print(f"  {measure} {name}: {', '.join(f'{t:.2f}' for t in step_times)} s", flush=True)
            finite = {name: all(v == v and abs(v) != float("inf") for v in values) for name, values in losses.items()}
            print(f"  {measure}: every step returned a finite scalar loss: {finite}")
            entry["losses"][measure] = losses
            entry["times_s"][measure] = times
            rows.append(
                (LABELS[measure] + f", batch {args.batch_size}", "s", {n: median(t) for n, t in times.items()}, "time")
            )

        if "infer" in args.measure_set:
            functions = {}
            for name, model in models.items():
                load_vq(model, vq_file, device)
                functions[name] = inference_fn(model, precision, device)
            for batch_size, label in ((1, "infer1"), (args.batch_size, "inferB")):
                batch = input_batch(batch_size, args.image_size, args.seed + 2).to(device)
                times = time_inference(functions, batch, args.repeats, args.warmup, device)
                entry["times_s"][label] = times
                rows.append(
                    (LABELS[label].format(b=args.batch_size), "s", {n: median(t) for n, t in times.items()}, "time")
                )
                print(
                    f"  {label}: " + "; ".join(f"{n} {', '.join(f'{t:.2f}' for t in ts)} s" for n, ts in times.items()),
                    flush=True,
                )
        del models

        if "memory" in args.measure_set:
            for measure in ("train2", "train3", "infer"):
                values = {}
                for name in variants:
                    found = measure_memory(name, measure, precision, device, args, vq_file)
                    entry["memory_mib"][f"{measure}/{name}"] = found
                    values[name] = found["cuda_peak_mib"] if device.type == "cuda" else found["peak_rss_mib"]
                    print(f"  memory {measure} {name}: {found}", flush=True)
                unit = "MiB (CUDA peak)" if device.type == "cuda" else "MiB (peak RSS)"
                rows.append((LABELS[f"mem_{measure}"].format(b=args.batch_size), unit, values, "memory"))

        print(f"\n  Medians, {device.type} {precision}, {args.image_size}x{args.image_size}:")
        print_table(rows, variants)
        entry["table"] = [
            {"measure": label, "unit": unit, "values": values, "kind": kind} for label, unit, values, kind in rows
        ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    vq_file = prepare_cache()
    quiet()
    if args.worker:
        print(json.dumps(memory_worker(json.loads(args.worker))), flush=True)
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.device)]
        if devices[0].type == "cuda" and not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available")
    write_random_vq(vq_file, args.seed)
    variants = {"off": [OURS], "on": [OURS_CL], "both": [OURS, OURS_CL]}[args.channels_last] + [ANOMALIB]

    import anomalib

    load = os.getloadavg()
    print("DSR speed: anomalib_dsr.Dsr vs anomalib's built-in Dsr (paper architecture, random weights)")
    print(f"  command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"  torch {torch.__version__}, anomalib {anomalib.__version__}, python {platform.python_version()}")
    print(
        f"  CPU: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"native bf16: {native_bf16_cpu()}, load average {load[0]:.1f}"
    )
    if torch.cuda.is_available():
        print(f"  GPU: {torch.cuda.get_device_name()}")
    print(
        f"  image {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.repeats} timed repeats "
        f"({args.rounds} round(s), {args.warmup} warm-up step(s) per fit), precisions {','.join(args.precisions)}"
    )
    print(f"  anomalib's VQ file (random weights): {vq_file}")
    results: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "measure_set"},
        "environment": {
            "torch": torch.__version__,
            "anomalib": anomalib.__version__,
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "native_bf16_cpu": native_bf16_cpu(),
            "load_average_start": load,
        },
    }
    started = time.perf_counter()
    for device in devices:
        run_device(device, args, vq_file, variants, results)
        print_bf16_against_fp32(results, device.type, variants)
    results["environment"]["load_average_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - started
    print(
        f"\nDone in {results['wall_s']:.0f} s; load average at the end {os.getloadavg()[0]:.1f} "
        f"(above {os.cpu_count()}: other processes competed for the CPU, figures are noisy)."
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"Figures written to {args.json}")


if __name__ == "__main__":
    main()
