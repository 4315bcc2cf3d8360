"""Checkpoints: :func:`load_dsr_checkpoint`, the one loader of ``Dsr`` Lightning checkpoints (``loading.py``), and
the import and export of the authors' released ``.pckl`` files (``original_checkpoint.py``; their key layout lives
with the model, in ``anomalib_dsr.model.original_format``)."""

from anomalib_dsr.checkpoints.loading import load_dsr_checkpoint

__all__ = ["load_dsr_checkpoint"]
