"""Deployment benchmark: latency and accuracy of DSR in PyTorch and in OpenVINO at several precisions.

Rows: PyTorch FP32 (eager, no_grad), OpenVINO FP32 IR run with f32 inference precision, the same IR at the
device's default precision (bf16 on CPUs with AMX, f32 elsewhere), the FP16 IR (``compression_type=FP16``,
f16 weights) at the default precision, and the INT8 IR (``compression_type=INT8_PTQ``: NNCF post-training
quantisation calibrated on the normal training images, the code path unquantised, ``anomalib_dsr.deploy.export``) at
the default and at f32 precision. Columns: median latency per image for 256x256 RGB input at batch 1 and
batch 8, image AUROC and pixel AP on the demo dataset's test split, the largest normalised-score and map
differences from PyTorch, the share of map pixels off by more than 1e-3, and how long the export took.

    python benchmarks/deploy_speed.py                     # demo settings (``make demo``), 256x256 model
    python benchmarks/deploy_speed.py --ckpt model.ckpt   # an already trained checkpoint (demo dataset)
    python benchmarks/deploy_speed.py --ckpt model.ckpt --test-images 100   # accuracy on 100 + 100 test images
    python benchmarks/deploy_speed.py --paper-widths      # paper's widths at 256x256, random weights: speed only
    python benchmarks/deploy_speed.py --quick             # tiny model at 64x64, a few steps: checks the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from common import cpu_name, demo_datamodule

SIZE = 256


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps (a smoke run of the script)")
    parser.add_argument("--ckpt", type=Path, help="trained Dsr checkpoint to benchmark instead of training one")
    parser.add_argument(
        "--paper-widths", action="store_true",
        help="untrained model at the paper's widths and 256x256 (INT8 calibrated on the demo training images): "
        "latencies only, the accuracy columns stay empty",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument(
        "--test-images", type=int, metavar="N",
        help="accuracy on N good and N defective test images of the demo generator (the training images stay the "
        "demo's): one swapped good/defective pair is 1/N² of image AUROC (default: the demo's 16 good, 24 defective)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for PyTorch and OpenVINO")
    parser.add_argument(
        "--repeats", type=int, help="timed runs per measurement, median reported (default 20; --quick 3)"
    )
    args = parser.parse_args()
    if args.paper_widths and (args.ckpt or args.quick):
        parser.error("--paper-widths builds its own untrained model: leave out --ckpt and --quick")
    return args


def test_sizes(args: argparse.Namespace) -> dict[str, int]:
    """``make_demo_dataset``'s test-set sizes for ``--test-images`` (and ``--quick``)."""
    if args.test_images:
        return {"num_test_good": args.test_images, "num_test_defect": args.test_images // 2}
    return {"num_test_good": 4, "num_test_defect": 2} if args.quick else {}


def train(output: Path, quick: bool, sizes: dict[str, int]) -> tuple[object, object]:
    """Demo dataset, VQ-VAE and DSR with ``DemoSettings`` (``--quick``: tiny ones); returns model, datamodule."""
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_dsr import Dsr
    from anomalib_dsr.data.demo_data import make_demo_dataset
    from anomalib_dsr.data.general_images import GENERAL_VQ_FILE
    from anomalib_dsr.workflows.demo import DemoSettings
    from anomalib_dsr.workflows.pretrain_vq import pretrain_vq

    settings = DemoSettings()
    if quick:
        tiny = {"channels": 16, "res_hidden": 8, "num_embeddings": 32, "embedding_dim": 16}
        settings = replace(
            settings, num_train=16, dsr_steps=12, batch_size=4, decoder_bottleneck=8, unet_width=8, **tiny
        )
    seed_everything(settings.seed, workers=True)
    make_demo_dataset(
        output / "data", image_size=settings.image_size, num_train=settings.num_train, seed=settings.seed, **sizes
    )
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu"}
    vq = GENERAL_VQ_FILE
    if quick:  # a tiny general VQ-VAE at the tiny widths
        vq = pretrain_vq(None, output / "vq.pckl", image_size=64, max_steps=60, batch_size=16, seed=settings.seed,
                         resume=False, trainer_kwargs=dict(quiet), general=True, **settings.vq_widths)  # fmt: skip
    # --quick: the model works at 64x64 (the 256x256 input is resized inside the graph); only checks the script
    model = Dsr(vq_weights=vq, **{**settings.dsr_kwargs, "image_size": 64 if quick else SIZE})
    datamodule = demo_datamodule(output / "data", settings.batch_size)
    engine = Engine(max_steps=settings.dsr_steps, default_root_dir=output / "results", logger=False,
                    check_val_every_n_epoch=None, val_check_interval=settings.dsr_steps, **quiet)  # fmt: skip
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    print(f"trained DSR in {time.perf_counter() - start:.0f} s")
    return model, datamodule


def test_set(root: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Test images (N, 3, h, w) in [0, 1], labels (N,), masks (N, h, w) of the demo dataset."""
    from anomalib.data.utils import read_image, read_mask

    images, labels, masks = [], [], []
    for path in sorted((root / "test").rglob("*.png")):
        image = read_image(path, as_tensor=True)
        images.append(image)
        anomalous = path.parent.name != "good"
        labels.append(int(anomalous))
        mask_path = root / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        masks.append(read_mask(mask_path, as_tensor=True).float() if anomalous else torch.zeros(image.shape[-2:]))
    return torch.stack(images), torch.tensor(labels), torch.stack([m.reshape(image.shape[-2:]) for m in masks])


def metrics(scores: np.ndarray, maps: np.ndarray, labels: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """Image AUROC and pixel AP, the ground truth resized (nearest) to the maps' size."""
    maps = torch.from_numpy(np.asarray(maps, dtype=np.float32))
    gt = F.interpolate(masks[:, None], size=maps.shape[-2:], mode="nearest")[:, 0] > 0.5
    auroc = binary_auroc(torch.from_numpy(np.asarray(scores, dtype=np.float32)).flatten(), labels)
    pixel_ap = binary_average_precision(maps.flatten(), gt.flatten().long())
    return float(auroc), float(pixel_ap)


def median_latency(run, batch: np.ndarray, repeats: int) -> float:
    """Median seconds per image of ``run(batch)`` after warm-up."""
    for _ in range(3):
        run(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / len(batch)


def untrained_paper_model():
    """``Dsr`` at the paper's widths and 256x256 with random weights and the normalisation of a trained model's
    range (scores and maps in [0, 1], thresholds at 0.5): anomalib's unset statistics are NaN, which leaves
    NaN quantisation ranges in the INT8 graph and OpenVINO refuses to compile it."""
    from anomalib_dsr import Dsr

    model = Dsr(image_size=SIZE)
    post = model.post_processor
    for name in ("image_min", "pixel_min"):
        getattr(post, name).fill_(0.0)
    for name in ("image_max", "pixel_max"):
        getattr(post, name).fill_(1.0)
    post._image_threshold.fill_(0.5)  # noqa: SLF001
    post._pixel_threshold.fill_(0.5)  # noqa: SLF001
    return model


def main() -> None:
    args = parse_args()
    args.repeats = args.repeats or (3 if args.quick else 20)
    torch.set_num_threads(args.threads)
    import openvino as ov
    from anomalib.deploy import CompressionType
    from anomalib.engine import Engine

    from anomalib_dsr.checkpoints import load_dsr_checkpoint

    output = args.output or Path(tempfile.mkdtemp(prefix="dsr_bench_"))
    output.mkdir(parents=True, exist_ok=True)
    if args.ckpt or args.paper_widths:
        from anomalib_dsr.data.demo_data import make_demo_dataset
        from anomalib_dsr.workflows.demo import DemoSettings

        settings = DemoSettings()
        make_demo_dataset(
            output / "data", image_size=settings.image_size, num_train=settings.num_train, seed=settings.seed,
            **test_sizes(args),
        )  # fmt: skip
        datamodule = demo_datamodule(output / "data")
        model = untrained_paper_model() if args.paper_widths else load_dsr_checkpoint(args.ckpt)
    else:
        model, datamodule = train(output, args.quick, test_sizes(args))
    model = model.cpu().eval()
    images, labels, masks = test_set(output / "data" / "gravel")

    engine = Engine(default_root_dir=output / "engine", logger=False, accelerator="cpu")
    exports, export_seconds = {}, {}
    for name, compression in (("fp32", None), ("fp16", CompressionType.FP16), ("int8", CompressionType.INT8_PTQ)):
        start = time.perf_counter()
        exports[name] = engine.export(
            model, "openvino", export_root=output / "export" / name, compression_type=compression,
            datamodule=datamodule if compression == CompressionType.INT8_PTQ else None,
            onnx_kwargs={"opset_version": 18},
        )  # fmt: skip
        export_seconds[name] = time.perf_counter() - start
        print(f"exported {name} in {export_seconds[name]:.0f} s")

    core = ov.Core()
    threads = {"INFERENCE_NUM_THREADS": args.threads}
    default_precision = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
    default_precision = (
        default_precision.to_string() if hasattr(default_precision, "to_string") else str(default_precision)
    )

    def openvino_runner(path: Path, precision: str | None):
        config = dict(threads, **({"INFERENCE_PRECISION_HINT": precision} if precision else {}))
        compiled = core.compile_model(core.read_model(path), "CPU", config)

        def run(batch: np.ndarray) -> dict[str, np.ndarray]:
            result = compiled(batch)
            return {output.any_name: result[output] for output in compiled.outputs}

        return run

    def torch_run(batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            result = model(torch.from_numpy(batch))
        return {key: value.numpy() for key, value in result._asdict().items() if value is not None}

    variants = {
        "PyTorch FP32": (torch_run, None),
        "OpenVINO FP32 IR, f32 precision": (openvino_runner(exports["fp32"], "f32"), "fp32"),
        f"OpenVINO FP32 IR, device default ({default_precision})": (openvino_runner(exports["fp32"], None), "fp32"),
        "OpenVINO FP16 IR (default precision)": (openvino_runner(exports["fp16"], None), "fp16"),
        "OpenVINO INT8 PTQ IR (default precision)": (openvino_runner(exports["int8"], None), "int8"),
        "OpenVINO INT8 PTQ IR, f32 precision": (openvino_runner(exports["int8"], "f32"), "int8"),
    }
    rng = np.random.default_rng(0)
    inputs = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True).clamp(0, 1).numpy()
    batch1, batch8 = inputs[:1], inputs[rng.choice(len(inputs), 8, replace=len(inputs) < 8)]

    def in_chunks(run, batch: np.ndarray) -> dict[str, np.ndarray]:
        """``run`` on at most 25 images at a time (a large test set at once would hold GBs of activations)."""
        parts = [run(chunk) for chunk in np.array_split(batch, max(1, len(batch) // 25))]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    reference = None if args.paper_widths else in_chunks(torch_run, images.numpy())

    rows = []
    for name, (run, export_name) in variants.items():
        accuracy = (float("nan"),) * 5  # an untrained model's scores measure nothing
        if not args.paper_widths:
            outputs = in_chunks(run, images.numpy())
            auroc, pixel_ap = metrics(outputs["pred_score"], outputs["anomaly_map"], labels, masks)
            map_gap = np.abs(outputs["anomaly_map"] - reference["anomaly_map"])
            score_diff = float(np.abs(outputs["pred_score"] - reference["pred_score"]).max())
            accuracy = (auroc, pixel_ap, score_diff, float(map_gap.max()), float((map_gap > 1e-3).mean()))
        rows.append(
            (
                name,
                median_latency(run, batch1, args.repeats) * 1e3,
                median_latency(run, batch8, max(args.repeats // 4, 3)) * 1e3,
                *accuracy,
                f"{export_seconds[export_name]:.0f} s" if export_name else "—",
            )
        )

    widths = {
        k: v for k, v in model.hparams.items() if k in ("channels", "num_embeddings", "embedding_dim", "unet_width")
    }
    print(
        f"\nDSR {widths}, model {model.hparams['image_size']}, {len(images)} demo test images "
        f"({int((labels == 0).sum())} good, {int(labels.sum())} defective), input {SIZE}x{SIZE}, "
        f"{args.threads} threads, {cpu_name()}, OpenVINO {ov.get_version().split('-')[0]}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(
        "| variant | ms/image, batch 1 | ms/image, batch 8 | image AUROC | pixel AP | max Δ score vs PyTorch "
        "| max Δ map vs PyTorch | map pixels off > 1e-3 | export time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, lat1, lat8, *accuracy, seconds in rows:
        specs = (".3f", ".3f", ".1e", ".1e", ".2%")
        cells = (format(value, spec) if value == value else "—" for value, spec in zip(accuracy, specs))  # NaN: none
        print(f"| {name} | {lat1:.1f} | {lat8:.1f} | {' | '.join(cells)} | {seconds} |")


if __name__ == "__main__":
    main()
