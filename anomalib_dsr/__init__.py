"""DSR (dual subspace re-projection, ECCV 2022) as an anomalib plugin model."""

from anomalib_dsr import _moved
from anomalib_dsr.model import Dsr, DsrModel

_moved.install()  # the old import paths of moved modules

__all__ = ["Dsr", "DsrModel"]
__version__ = "0.1.0"
