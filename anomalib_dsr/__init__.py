"""DSR (dual subspace re-projection, ECCV 2022) as an anomalib plugin model."""

from anomalib_dsr.lightning_model import Dsr
from anomalib_dsr.torch_model import DsrModel

__all__ = ["Dsr", "DsrModel"]
__version__ = "0.1.0"
