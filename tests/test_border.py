"""Regression test for the border frame: the demo once scored a frame along the image border of good images.

Cause found (README, "The demo"): not the rotation augmentation (the frame stayed with rotation off and with
reflection fill) but the VQ-VAE's border: a VQ-VAE trained briefly on the category's own images decodes the
outermost rows darker, D_gen and D_spc disagree there, and the detection modules learned to answer it. This
checks the property on a tiny model trained with every training image rotated (black fill) in both phases.
"""

from __future__ import annotations

import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from conftest import IMAGE_SIZE, TRAINER_KWARGS

BAND = 4  # pixels


def test_rotation_trained_model_does_not_score_the_border_of_good_images_above_the_interior(
    make_dsr, make_datamodule, tmp_path
) -> None:
    seed_everything(0)  # the result depends on the initial weights and draws, not on the tests that ran before
    model = make_dsr(rotation_probability=1.0)
    model.image_anomalies.rotation_probability = 1.0
    datamodule = make_datamodule()
    Engine(max_steps=60, default_root_dir=tmp_path, logger=False, **TRAINER_KWARGS).fit(model, datamodule=datamodule)

    model.eval()
    datamodule.setup()
    images = torch.cat([batch.image[batch.gt_label == 0] for batch in datamodule.test_dataloader()])
    with torch.no_grad():
        anomaly_map = model.model(images).anomaly_map
        _, _, probs_lo = model.model.detect(images)
    border = torch.zeros(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    border[:BAND] = border[-BAND:] = border[:, :BAND] = border[:, -BAND:] = True
    for name, values in (("anomaly map", anomaly_map), ("P_lo", probs_lo[:, 1])):
        outer, inner = values[:, border].mean(), values[:, ~border].mean()
        assert outer <= inner + 0.02, f"{name}: border {outer:.3f} above interior {inner:.3f}"
