"""``anomalib-dsr``: DSR tools that anomalib's own CLI does not cover.

Training, testing, prediction and export go through ``anomalib train|test|predict|export --model
anomalib_dsr.Dsr``; this command adds VQ-VAE pretraining, the offline demo, import and export of the
authors' released weights, the paper-comparison table, the benchmark against PatchCore and DRAEM, a
stage-by-stage inspection of a trained model, and the KolektorSDD layout.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from anomalib_dsr.checkpoints.original_checkpoint import export_original, import_original
from anomalib_dsr.data.kolektor import KolektorError, prepare_kolektor
from anomalib_dsr.evaluation.paper_table import table_from_files
from anomalib_dsr.model.original_format import VQ_FILE_NAME, WeightsError
from anomalib_dsr.workflows.benchmark import BenchmarkConfigError, run_benchmark
from anomalib_dsr.workflows.demo import DemoSettings, run_demo
from anomalib_dsr.workflows.inspect import DIFF_MAX, InspectError, format_report, inspect
from anomalib_dsr.workflows.pretrain_vq import pretrain_vq
from anomalib_dsr.workflows.pretrain_warm_start import pretrain_warm_start, recipe_arguments


def _pretrain_vq(args: argparse.Namespace) -> None:
    if bool(args.images) == args.general:
        raise SystemExit("anomalib-dsr pretrain-vq: error: give either --images DIR [DIR ...] or --general.")
    path = pretrain_vq(
        args.images,
        args.output,
        image_size=args.image_size,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        checkpoint_dir=args.checkpoint_dir,
        resume=not args.no_resume,
        seed=args.seed,
        trainer_kwargs={"accelerator": args.accelerator, "precision": args.precision},
        channels=args.channels,
        res_hidden=args.res_hidden,
        num_embeddings=args.num_embeddings,
        embedding_dim=args.embedding_dim,
        general=args.general,
    )
    print(f"VQ-VAE weights written to {path}")


def _pretrain_warm_start(args: argparse.Namespace) -> None:
    try:
        arguments = recipe_arguments(args.config)
    except (OSError, KeyError, TypeError) as error:
        msg = f"anomalib-dsr pretrain-warm-start: error: {args.config} is not a recipe with model.init_args: {error}"
        raise SystemExit(msg) from None
    trainer_kwargs = {"accelerator": args.accelerator}
    path = pretrain_warm_start(
        args.output, arguments, args.max_steps, args.batch_size, args.seed, not args.no_resume, trainer_kwargs
    )
    print(f"Warm start written to {path}; train with --model.warm_start {path}")


def _demo(args: argparse.Namespace) -> None:
    run_demo(args.output, DemoSettings(dsr_steps=args.steps, vq_weights=args.vq_weights))


def _import_original(args: argparse.Namespace) -> None:
    try:
        path = import_original(args.checkpoints, args.category, args.output, vq=args.vq)
    except WeightsError as error:
        raise SystemExit(f"anomalib-dsr import-original: error: {error}") from None
    print(f"Lightning checkpoint written to {path}; e.g. anomalib test --model anomalib_dsr.Dsr --ckpt_path {path}")


def _export_original(args: argparse.Namespace) -> None:
    try:
        paths = export_original(args.ckpt, args.output, args.category)
    except WeightsError as error:
        raise SystemExit(f"anomalib-dsr export-original: error: {error}") from None
    print("Original-layout files written:", *paths, sep="\n  ")


def _paper_table(args: argparse.Namespace) -> None:
    try:
        table = table_from_files(args.results)
    except (ValueError, OSError) as error:
        raise SystemExit(f"anomalib-dsr paper-table: error: {error}") from None
    if args.output:
        Path(args.output).write_text(table + "\n")
    print(table)


def _benchmark(args: argparse.Namespace) -> None:
    try:
        folder = run_benchmark(args.config)
    except BenchmarkConfigError as error:
        raise SystemExit(f"anomalib-dsr benchmark: error: {error}") from None
    print((folder / "report.md").read_text())
    print(f"Results CSV, report and chart in {folder}")


def _inspect(args: argparse.Namespace) -> None:
    try:
        report = inspect(
            args.ckpt,
            args.images,
            args.output,
            masks=args.masks,
            limit=args.limit,
            batch_size=args.batch_size,
            device=args.device,
            diff_max=args.diff_max,
        )
    except InspectError as error:
        raise SystemExit(f"anomalib-dsr inspect: error: {error}") from None
    print(format_report(report))
    print(f"Panels in {report['panels']}, figures in {Path(args.output) / 'inspect.json'}")


def _prepare_kolektor(args: argparse.Namespace) -> None:
    try:
        layout = prepare_kolektor(args.src, args.out, args.test_good_share, args.seed, args.force, args.val_share)
    except KolektorError as error:
        raise SystemExit(f"anomalib-dsr prepare-kolektor: error: {error}") from None
    print(layout.summary())
    print(f'Use it as anomalib.data.MVTecAD(root="{args.out}", category="kolektor").')
    if layout.val_parts:
        print(
            f'Choose settings on anomalib.data.MVTecAD(root="{args.out}", category="kolektor_val"), never on the test.'
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomalib-dsr", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser("pretrain-vq", help="Pretrain the general VQ-VAE (phase 1) on folders of images.")
    pretrain.add_argument("--images", nargs="+", default=None, help="Folders searched recursively for images.")
    pretrain.add_argument(
        "--general",
        action="store_true",
        help="Train on the augmented photographs that installed packages ship (no download; see README).",
    )
    pretrain.add_argument("--output", required=True, help="Weights file to write (original DSR layout).")
    pretrain.add_argument("--image-size", type=int, default=256, help="Training resolution (paper: 256).")
    pretrain.add_argument("--max-steps", type=int, default=100_000, help="Optimisation steps (recipe: 100,000).")
    pretrain.add_argument("--batch-size", type=int, default=64, help="Batch size (recipe: 64).")
    pretrain.add_argument("--num-workers", type=int, default=4)
    pretrain.add_argument("--checkpoint-dir", default=None, help="Lightning checkpoints (default: beside --output).")
    pretrain.add_argument("--no-resume", action="store_true", help="Start afresh even if a last.ckpt exists.")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--accelerator", default="auto")
    pretrain.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed.")
    pretrain.add_argument("--channels", type=int, default=128, help="Paper: 128.")
    pretrain.add_argument("--res-hidden", type=int, default=64, help="Paper: 64.")
    pretrain.add_argument("--num-embeddings", type=int, default=4096, help="Paper: 4096.")
    pretrain.add_argument("--embedding-dim", type=int, default=128, help="Paper: 128.")
    pretrain.set_defaults(func=_pretrain_vq)

    warm = commands.add_parser(
        "pretrain-warm-start", help="Train phases 2 and 3 once on general images: a warm start to fine-tune."
    )
    warm.add_argument("--config", required=True, help="The recipe whose Dsr arguments to use: configs/dsr_cpu.yaml.")
    warm.add_argument("--output", required=True, help="Warm-start file to write (float16 weights).")
    warm.add_argument("--max-steps", type=int, default=3000, help="Training steps on the general images.")
    warm.add_argument("--batch-size", type=int, default=8, help="Batch size (paper: 8).")
    warm.add_argument("--seed", type=int, default=0)
    warm.add_argument("--no-resume", action="store_true", help="Start afresh even if a last.ckpt exists.")
    warm.add_argument("--accelerator", default="auto")
    warm.set_defaults(func=_pretrain_warm_start)

    demo = commands.add_parser("demo", help="Build the demo dataset, pretrain, train, test (offline, CPU).")
    demo.add_argument("--output", default="demo_output", help="Folder for all demo outputs.")
    demo.add_argument("--steps", type=int, default=DemoSettings.dsr_steps, help="DSR training steps.")
    demo.add_argument(
        "--vq-weights", default=None, help="General VQ-VAE file at the demo's widths (default: the one shipped)."
    )
    demo.set_defaults(func=_demo)

    imp = commands.add_parser("import-original", help="The authors' released weights → Lightning checkpoint of Dsr.")
    imp.add_argument("--checkpoints", required=True, help="Folder of the released DSR_*_<category>.pckl files.")
    imp.add_argument("--category", required=True, help="The <category> in those file names, e.g. bottle.")
    imp.add_argument("--vq", default=None, help=f"General VQ-VAE file (default: CHECKPOINTS/{VQ_FILE_NAME}).")
    imp.add_argument("--output", required=True, help="Lightning checkpoint to write, e.g. model.ckpt.")
    imp.set_defaults(func=_import_original)

    exp = commands.add_parser("export-original", help="A Dsr Lightning checkpoint → the authors' file layout.")
    exp.add_argument("--ckpt", required=True, help="Lightning checkpoint of anomalib_dsr.Dsr.")
    exp.add_argument("--output", required=True, help="Folder for the six .pckl files.")
    exp.add_argument("--category", required=True, help="The <category> to put in the file names.")
    exp.set_defaults(func=_export_original)

    table = commands.add_parser("paper-table", help="Per-category test metrics → markdown table beside the paper's.")
    table.add_argument("results", nargs="+", help="JSON/CSV metrics: CATEGORY=PATH, or PATH with the category in it.")
    table.add_argument("--output", default=None, help="Also write the table to this markdown file.")
    table.set_defaults(func=_paper_table)

    bench = commands.add_parser("benchmark", help="DSR vs PatchCore and DRAEM through anomalib's Benchmark pipeline.")
    bench.add_argument("--config", required=True, help="Benchmark config, e.g. configs/benchmark/demo.yaml.")
    bench.set_defaults(func=_benchmark)

    insp = commands.add_parser(
        "inspect", help="Panels of every stage (paper Fig. 8) and per-stage figures on test images with masks."
    )
    insp.add_argument("ckpt", help="Lightning checkpoint of anomalib_dsr.Dsr.")
    insp.add_argument(
        "images",
        help="Folder of test images (searched recursively; those in a folder named 'good' need no mask), "
        "or an MVTec AD category folder (its test/ images, ground_truth/ masks).",
    )
    insp.add_argument("--masks", default=None, help="Folder of the masks: <sub>/<stem>_mask.png or <sub>/<stem>.png.")
    insp.add_argument("--output", required=True, help="Folder for panels/*.png and inspect.json.")
    insp.add_argument("--limit", type=int, default=None, help="At most N images, spread evenly over the sorted list.")
    insp.add_argument("--batch-size", type=int, default=8)
    insp.add_argument("--device", default="cpu", help="torch device, e.g. cuda.")
    insp.add_argument(
        "--diff-max", type=float, default=DIFF_MAX, help=f"Top of the |I_gen - I_spc| colour scale ({DIFF_MAX})."
    )
    insp.set_defaults(func=_inspect)

    kolektor = commands.add_parser("prepare-kolektor", help="Lay a downloaded KolektorSDD out as an MVTec AD category.")
    kolektor.add_argument("src", help="The unpacked KolektorSDD folder, holding kos01 ... kos50.")
    kolektor.add_argument("out", help="Dataset root: writes OUT/kolektor/{train,test,ground_truth}.")
    kolektor.add_argument(
        "--test-good-share", type=float, default=0.2, help="Share of the defect-free images in test/good (default 0.2)."
    )
    kolektor.add_argument("--seed", type=int, default=0, help="Seed of the train/test split of the defect-free images.")
    kolektor.add_argument(
        "--val-share",
        type=float,
        default=0.0,
        help="Share of the commutators (whole kosNN folders) held out as the validation split OUT/kolektor_val: "
        "none of their images in OUT/kolektor/test (default 0: no validation split).",
    )
    kolektor.add_argument(
        "--force", action="store_true", help="Replace OUT/kolektor(_val) if it holds anything else than this layout."
    )
    kolektor.set_defaults(func=_prepare_kolektor)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
