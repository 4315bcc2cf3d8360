"""``anomalib-dsr inspect``: every stage of DSR's inference chain on test images with defect masks.

For a trained ``Dsr`` checkpoint and a folder of test images with masks it writes, per image, the paper's
Fig. 8 as one PNG of six panels (input with the mask's contour, I_gen, I_spc, |I_gen − I_spc|, P_lo, final map)
and computes per-stage figures over the whole folder, printed as a table and written to ``inspect.json``:

- reconstruction error of I_gen and of I_spc: per pixel, the mean over the three channels of the absolute
  difference to the input (L1, the input as the model sees it: after its pre-processor), averaged over all
  defect pixels ("inside") and over all other pixels ("outside") of the folder;
- pixel AUROC of |I_gen − I_spc| (the same per-pixel channel mean), of P_lo's anomaly channel and of the
  final map, over every pixel of every image (defect-free images count with all-zero masks);
- image AUROC of the image score, when the folder has images with and without defects.

The stages come from :meth:`~anomalib_dsr.model.torch_model.DsrModel.stages`, the model's own forward path.
Memory grows with images x pixels (three maps are kept for the AUROCs): ``limit`` bounds it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from anomalib.data.utils import read_image, read_mask
from anomalib.pre_processing import PreProcessor
from torchmetrics.functional.classification import binary_auroc
from torchvision import tv_tensors

from anomalib_dsr.checkpoints import load_dsr_checkpoint
from anomalib_dsr.data.image_folders import IMAGE_EXTENSIONS
from anomalib_dsr.model.lightning_model import Dsr
from anomalib_dsr.model.original_format import WeightsError
from anomalib_dsr.model.torch_model import DsrStages

RECONSTRUCTIONS = ("I_gen", "I_spc")
MAPS = ("|I_gen - I_spc|", "P_lo", "final map")
# Fixed colour scales (upper ends; all start at 0), the same on every panel so that panels compare.
DIFF_MAX = 0.5  # |I_gen − I_spc|: pixel values lie in [0, 1]; real differences rarely exceed half of that
PANEL_INCHES = 2.4
TITLE_INCHES = 0.5
DPI = 100
PANELS_FOLDER = "panels"
REPORT_FILE = "inspect.json"


class InspectError(ValueError):
    """Bad input to ``inspect``: the message names the path or value and what would be valid."""


@dataclass(frozen=True)
class Sample:
    """One test image; ``mask`` is ``None`` for a defect-free image (one in a folder named ``good``)."""

    image: Path
    mask: Path | None
    name: str  # the image's path under the image folder, ``/`` → ``_``, without suffix


def find_samples(images: str | Path, masks: str | Path | None = None, limit: int | None = None) -> list[Sample]:
    """The images under ``images`` (recursively, sorted) with their masks under ``masks``.

    The mask of ``images/<sub>/<stem>.<ext>`` is ``masks/<sub>/<stem>_mask.png`` (MVTec AD) or
    ``masks/<sub>/<stem>.png``; images in a folder named ``good`` have none (all-zero masks). Without ``masks``,
    ``images`` must be an MVTec AD category folder: its ``test/`` images with the masks in ``ground_truth/``.
    ``limit``: at most this many images, spread evenly over the sorted list (so every defect type shows).
    """
    images = Path(images)
    if not images.is_dir():
        msg = f"Image folder {images} does not exist: give a folder of test images or an MVTec AD category folder."
        raise InspectError(msg)
    if masks is None:
        if not ((images / "test").is_dir() and (images / "ground_truth").is_dir()):
            msg = (
                f"{images} is not an MVTec AD category folder (it lacks test/ and ground_truth/): give the masks' "
                "folder with --masks, or a category folder such as .../mvtec/bottle."
            )
            raise InspectError(msg)
        images, masks = images / "test", images / "ground_truth"
    masks = Path(masks)
    if not masks.is_dir():
        msg = f"Mask folder {masks} does not exist: give the folder of <image stem>_mask.png files."
        raise InspectError(msg)
    paths = sorted(
        p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and masks not in p.parents
    )
    if not paths:
        msg = f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {images}."
        raise InspectError(msg)
    if limit is not None:
        if limit < 1:
            msg = f"--limit must be a positive number of images, got {limit}."
            raise InspectError(msg)
        picks = torch.linspace(0, len(paths) - 1, min(limit, len(paths))).round().long().unique()
        paths = [paths[i] for i in picks.tolist()]

    samples, missing = [], []
    for path in paths:
        relative = path.relative_to(images)
        name = "_".join(relative.with_suffix("").parts)
        if "good" in relative.parts[:-1]:
            samples.append(Sample(path, None, name))
            continue
        candidates = [masks / relative.parent / f"{path.stem}_mask.png", masks / relative.parent / f"{path.stem}.png"]
        if (mask := next((c for c in candidates if c.is_file()), None)) is None:
            missing.append(f"{path} (looked for {' and '.join(map(str, candidates))})")
        samples.append(Sample(path, mask, name))
    if missing:
        msg = (
            f"{len(missing)} image(s) without a mask: {'; '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. "
            "Put each mask there, or move defect-free images into a folder named 'good'."
        )
        raise InspectError(msg)
    return samples


def load_dsr(ckpt: str | Path) -> Dsr:
    """The ``Dsr`` of a Lightning checkpoint (``anomalib train``, ``anomalib-dsr demo``), in eval mode
    (:func:`~anomalib_dsr.checkpoints.load_dsr_checkpoint`)."""
    try:
        return load_dsr_checkpoint(ckpt)
    except WeightsError as error:
        raise InspectError(str(error)) from None


def read_batch(samples: list[Sample], transform: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(B, 3, H, W)`` in [0, 1] and masks ``(B, H, W)`` bool, through the pre-processor's ``transform``
    as in anomalib's test loop (images resized with antialiasing, masks by nearest neighbour)."""
    images, masks = [], []
    for sample in samples:
        image = tv_tensors.Image(read_image(sample.image, as_tensor=True))
        size = tuple(image.shape[-2:])
        if sample.mask is None:
            mask = tv_tensors.Mask(torch.zeros(size, dtype=torch.uint8))
        else:
            mask = read_mask(sample.mask, as_tensor=True)
            if tuple(mask.shape[-2:]) != size:
                msg = (
                    f"Mask {sample.mask} is {tuple(mask.shape[-2:])} but its image {sample.image} is {size} (H, W): "
                    "they must match."
                )
                raise InspectError(msg)
        if transform is not None:
            image, mask = transform(image, mask)
        images.append(image.as_subclass(torch.Tensor))
        masks.append(mask.as_subclass(torch.Tensor) > 0)
    return torch.stack(images), torch.stack(masks)


def stage_maps(stages: DsrStages, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pixel maps ``(B, H, W)``: the errors |I_gen − input| and |I_spc − input| against ``images``
    ``(B, 3, H, W)`` (RGB; the model's images are BGR) and |I_gen − I_spc|, each a mean over the channels; P_lo's
    anomaly channel; the final map."""
    bgr = images.flip(1)
    return {
        "I_gen": (stages.image_gen - bgr).abs().mean(1),
        "I_spc": (stages.image_spc - bgr).abs().mean(1),
        MAPS[0]: (stages.image_gen - stages.image_spc).abs().mean(1),
        MAPS[1]: stages.probs_lo[:, 1],
        MAPS[2]: stages.anomaly_map,
    }


def render_panels(
    image: torch.Tensor,
    mask: torch.Tensor,
    reconstructions: tuple[torch.Tensor, torch.Tensor],
    maps: dict[str, torch.Tensor],
    title: str,
    diff_max: float = DIFF_MAX,
) -> Any:
    """A matplotlib ``Figure`` of six panels in a row: the input ``(3, H, W)`` RGB with the contour of ``mask``
    ``(H, W)``, I_gen and I_spc ``(3, H, W)`` RGB, and the ``MAPS`` ``(H, W)``: |I_gen − I_spc| on [0, ``diff_max``],
    P_lo and the final map on [0, 1]. Its size is fixed: ``6 · PANEL_INCHES x (PANEL_INCHES + TITLE_INCHES)`` inches
    at ``DPI``."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - only this command draws

    figure = Figure(figsize=(6 * PANEL_INCHES, PANEL_INCHES + TITLE_INCHES), dpi=DPI)
    axes = figure.subplots(1, 6)
    for axis, label, picture in zip(axes, ("input + mask", *RECONSTRUCTIONS), (image, *reconstructions), strict=False):
        axis.imshow(picture.permute(1, 2, 0).clamp(0, 1).numpy())
        axis.set_title(label, fontsize=9)
    if mask.any():
        axes[0].contour(mask.float().numpy(), levels=[0.5], colors="red", linewidths=0.8)
    for axis, label, vmax in zip(axes[3:], MAPS, (diff_max, 1.0, 1.0), strict=True):
        axis.imshow(maps[label].numpy(), cmap="inferno", vmin=0.0, vmax=vmax)
        axis.set_title(f"{label} [0, {vmax:g}]", fontsize=9)
    for axis in axes:
        axis.set_axis_off()
    figure.suptitle(title, fontsize=9)
    top = 1 - TITLE_INCHES / (PANEL_INCHES + TITLE_INCHES)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=top, wspace=0.05)
    return figure


def _auroc(preds: torch.Tensor, target: torch.Tensor) -> float | None:
    """Binary AUROC, ``None`` unless ``target`` holds both classes."""
    if target.all() or not target.any():
        return None
    return float(binary_auroc(preds, target.long()))


def _ratio(inside: float | None, outside: float | None) -> float | None:
    return inside / outside if inside is not None and outside else None


@torch.no_grad()
def inspect(
    ckpt: str | Path,
    images: str | Path,
    output: str | Path,
    masks: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    diff_max: float = DIFF_MAX,
) -> dict[str, Any]:
    """Run the checkpoint's model on the images of ``images`` (see :func:`find_samples`), write the panels to
    ``output/panels/<name>.png`` and the figures to ``output/inspect.json``; returns the figures."""
    if batch_size < 1:
        msg = f"--batch-size must be a positive number of images, got {batch_size}."
        raise InspectError(msg)
    samples = find_samples(images, masks, limit)
    model = load_dsr(ckpt).to(device)
    transform = model.pre_processor.transform if isinstance(model.pre_processor, PreProcessor) else None
    panels = Path(output) / PANELS_FOLDER
    panels.mkdir(parents=True, exist_ok=True)

    sums = torch.zeros(len(RECONSTRUCTIONS), 2, dtype=torch.float64)  # stage x (inside, outside) over the folder
    collected: dict[str, list[torch.Tensor]] = {label: [] for label in (*MAPS, "mask", "score")}
    per_image = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch, mask = read_batch(chunk, transform)
        stages = DsrStages(*(x.float().cpu() for x in model.model.stages(batch.to(device))))
        maps = stage_maps(stages, batch)
        for label in MAPS:
            collected[label].append(maps[label].flatten())
        collected["mask"].append(mask.flatten())
        collected["score"].append(stages.pred_score)

        # Per image: each map's sum and mean inside and outside the mask (None where there are no such pixels).
        weights = torch.stack((mask, ~mask)).double()  # (2, B, H, W)
        pixels = weights.sum((2, 3)).T  # (B, 2)
        image_sums = {label: torch.einsum("bhw,kbhw->bk", maps[label].double(), weights) for label in maps}
        sums += torch.stack([image_sums[label].sum(0) for label in RECONSTRUCTIONS])
        means = {label: total / pixels.clamp_min(1) for label, total in image_sums.items()}
        for i, sample in enumerate(chunk):
            score = float(stages.pred_score[i])
            per_image.append(
                {
                    "image": str(sample.image),
                    "mask": None if sample.mask is None else str(sample.mask),
                    "defect_pixels": int(pixels[i, 0]),
                    "pred_score": score,
                    **{
                        side: {label: float(v[i, k]) if pixels[i, k] else None for label, v in means.items()}
                        for k, side in enumerate(("mean_inside", "mean_outside"))
                    },
                }
            )
            reconstructions = (stages.image_gen[i].flip(0), stages.image_spc[i].flip(0))
            title = f"{sample.name}   score {score:.3f}"
            image_maps = {label: maps[label][i] for label in MAPS}
            figure = render_panels(batch[i], mask[i], reconstructions, image_maps, title, diff_max)
            figure.savefig(panels / f"{sample.name}.png", dpi=DPI)

    target = torch.cat(collected["mask"])
    counts = torch.stack((target.sum(), (~target).sum())).double()
    folder_means = [[float(s / c) if c else None for s, c in zip(row, counts, strict=True)] for row in sums]
    labels = torch.tensor([record["defect_pixels"] > 0 for record in per_image])
    report = {
        "checkpoint": str(ckpt),
        "images": len(samples),
        "defective_images": int(labels.sum()),
        "image_size": list(batch.shape[-2:]),
        "defect_pixels": int(counts[0]),
        "pixels": target.numel(),
        "error": "per pixel, mean over the RGB channels of |I - input| (L1), input after the pre-processor",
        "reconstruction_error": {
            stage: {"inside": inside, "outside": outside, "ratio": _ratio(inside, outside)}
            for stage, (inside, outside) in zip(RECONSTRUCTIONS, folder_means, strict=True)
        },
        "pixel_auroc": {label: _auroc(torch.cat(collected[label]), target) for label in MAPS},
        "image_auroc": _auroc(torch.cat(collected["score"]), labels),
        "panels": str(panels),
        "per_image": per_image,
    }
    (Path(output) / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    """The printed summary of :func:`inspect`'s figures: two tables and the image AUROC."""
    height, width = report["image_size"]
    lines = [
        f"{report['images']} images ({report['defective_images']} with defects; {report['defect_pixels']:,} "
        f"defect pixels of {report['pixels']:,}) at {height}x{width}, checkpoint {report['checkpoint']}",
        "",
        f"Reconstruction error ({report['error']})",
        f"{'stage':<17}{'inside':>9}{'outside':>9}{'ratio':>8}",
    ]
    for stage, row in report["reconstruction_error"].items():
        lines.append(f"{stage:<17}{_number(row['inside']):>9}{_number(row['outside']):>9}{_number(row['ratio'], 2):>8}")
    lines += ["", "Pixel AUROC over all pixels", f"{'map':<17}{'AUROC':>9}"]
    lines += [f"{label:<17}{_number(value):>9}" for label, value in report["pixel_auroc"].items()]
    lines += ["", f"Image AUROC of the image score: {_number(report['image_auroc'])}"]
    return "\n".join(lines)
