"""The DSR detector in anomalib's per-model layout, with its building blocks beside it.

- ``lightning_model.py``: :class:`Dsr`, the ``AnomalibModule`` (phases 2 and 3 in one ``fit``);
- ``torch_model.py``: :class:`DsrModel`, the forward pass from image to score and map;
- ``loss.py``: the phase-2 and phase-3 losses;
- ``anomaly_generator.py``: latent anomalies (phase 2) and Perlin image anomalies (phase 3);
- building blocks: ``vq_vae.py`` (general VQ-VAE and its codebooks), ``subspace_restriction.py``,
  ``object_decoder.py`` (D_spc), ``unet.py`` (anomaly detection and upsampling U-Nets), ``graph_capture.py``;
- phase 1: ``pretraining.py`` (general VQ-VAE training) and ``general_images.py`` (its offline images);
- ``data_check.py``: the scan of a datamodule's files before training.
"""

from anomalib_dsr.model.lightning_model import Dsr
from anomalib_dsr.model.torch_model import DsrModel

__all__ = ["Dsr", "DsrModel"]
