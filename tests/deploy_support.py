"""Shared by test_export.py and test_inferencer.py: one tiny trained DSR checkpoint and its OpenVINO export,
built once per session (module-level cache: pytest imports this module once)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from anomalib.data.utils import read_image
from anomalib.engine import Engine

from conftest import CATEGORY, IMAGE_SIZE, TRAINER_KWARGS

# The dynamo ONNX exporter implements opset >= 18 only; asking for anomalib's default 14 prints a failed
# down-conversion traceback (harmless: the model stays at 18).
ONNX_KWARGS = {"opset_version": 18}

_CACHE: dict[str, object] = {}


def demo_test_images(demo_root: Path) -> tuple[list[Path], torch.Tensor]:
    """The demo test images (good and defective) and their RGB batch ``(N, 3, 64, 64)`` in [0, 1]."""
    files = sorted((demo_root / CATEGORY / "test").rglob("*.png"))
    return files, torch.stack([read_image(path, as_tensor=True) for path in files])


def calibrate_post_processor(model, images: torch.Tensor) -> None:
    """Give the briefly trained model the normalisation spread of a trained one.

    After a few steps every raw score lies within ~1e-3 of 0.485, and anomalib's min-max normalisation divides
    by that spread: float32 rounding (~1e-7) is magnified ~1000x, which no exporter can match to 1e-4. A
    trained model spreads its scores over most of [0, 1]. Here min = 0 and max = 1 (normalised = raw
    shifted), and the thresholds sit at the median raw score and the median raw pixel, which splits the
    labels and masks half/half: the most demanding setting for label and mask agreement.
    """
    with torch.no_grad():
        raw = model.model(model.pre_processor(images))
    post = model.post_processor
    post.image_min.fill_(0.0)
    post.image_max.fill_(1.0)
    post.pixel_min.fill_(0.0)
    post.pixel_max.fill_(1.0)
    scores = raw.pred_score.sort().values
    middle = len(scores) // 2
    post._image_threshold.fill_(float((scores[middle - 1] + scores[middle]) / 2))
    post._pixel_threshold.fill_(float(raw.anomaly_map.flatten().median()))


def deployed(tmp_path_factory, demo_root: Path, tiny_widths: dict[str, int]) -> dict[str, object]:
    """Pretrain a tiny VQ-VAE for 400 steps, train DSR for 12, calibrate, save a checkpoint, export to OpenVINO.

    Not the session's 6-step VQ file: its decoder still outputs nearly flat images, and the U-Nets'
    InstanceNorm then divides by a tiny spread, so the model itself is ill-conditioned (float32 against
    float64 PyTorch differ by ~6e-4 in the anomaly map). Nor 200 steps: some latent vectors then lie
    almost halfway between two codes, and a 1e-6 change of the input (the exporters' resize rounding)
    flips the code and moves the anomaly map by ~0.03 in PyTorch itself. After 400 steps no test image is
    that close to a tie and float32 vs float64 differ by ~4e-5: differences beyond that are the exporter's.

    Returns ``checkpoint`` (Path), ``model`` (the Lightning model, eval), ``openvino`` (model.xml Path),
    ``root`` (the working folder).
    """
    if _CACHE:
        return _CACHE
    from anomalib.data import MVTecAD

    from anomalib_dsr import Dsr

    from anomalib_dsr.pretraining import pretrain_vq

    from conftest import VQ_WIDTHS

    root = tmp_path_factory.mktemp("deploy")
    vq_weights = pretrain_vq(
        [demo_root / CATEGORY / "train" / "good"],
        root / "vq.pckl",
        image_size=IMAGE_SIZE,
        max_steps=400,
        batch_size=4,
        resume=False,
        trainer_kwargs=dict(TRAINER_KWARGS),
        **VQ_WIDTHS,
    )
    model = Dsr(vq_weights=vq_weights, pre_processor=Dsr.configure_pre_processor((IMAGE_SIZE, IMAGE_SIZE)), **tiny_widths)
    datamodule = MVTecAD(root=demo_root, category=CATEGORY, train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=root / "train", max_steps=12, logger=False, **TRAINER_KWARGS)
    engine.fit(model, datamodule=datamodule)
    model.eval()
    calibrate_post_processor(model, demo_test_images(demo_root)[1])
    checkpoint = root / "dsr.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    openvino = engine.export(model, "openvino", export_root=root / "export", onnx_kwargs=dict(ONNX_KWARGS))
    _CACHE.update(checkpoint=checkpoint, model=model, openvino=Path(openvino), root=root, engine=engine)
    return _CACHE


def compare(reference, outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """Parity figures of exported ``outputs`` against the Lightning model's ``reference`` InferenceBatch."""
    ref = {key: value.detach().cpu().numpy() for key, value in reference._asdict().items() if value is not None}
    assert set(ref) <= set(outputs), (sorted(ref), sorted(outputs))
    for key in ref:
        assert outputs[key].shape == ref[key].shape, (key, outputs[key].shape, ref[key].shape)
    return {
        "pred_score": float(np.abs(outputs["pred_score"].astype(np.float64) - ref["pred_score"]).max()),
        "anomaly_map": float(np.abs(outputs["anomaly_map"].astype(np.float64) - ref["anomaly_map"]).max()),
        "anomaly_map_mean": float(np.abs(outputs["anomaly_map"].astype(np.float64) - ref["anomaly_map"]).mean()),
        "pred_label": float((outputs["pred_label"].astype(bool) != ref["pred_label"].astype(bool)).mean()),
        "pred_mask": float((outputs["pred_mask"].astype(bool) != ref["pred_mask"].astype(bool)).mean()),
    }


def assert_parity(figures: dict[str, float], label: str = "") -> None:
    """The issue's tolerances: score 1e-4, map 1e-3, identical labels, masks on <= 0.1 % of pixels."""
    assert figures["pred_score"] <= 1e-4, (label, figures)
    assert figures["anomaly_map"] <= 1e-3, (label, figures)
    assert figures["pred_label"] == 0.0, (label, figures)
    assert figures["pred_mask"] <= 1e-3, (label, figures)
