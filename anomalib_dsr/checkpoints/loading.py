"""The one way to load a ``Dsr`` Lightning checkpoint: ``weights_only=True`` and one set of clear errors."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

from anomalib_dsr.model import Dsr
from anomalib_dsr.model.original_format import WeightsError

# What loading something other than a Dsr checkpoint raises: not a zip/pickle, refused by weights_only, another
# model's hyper-parameters or state, or Dsr.on_load_checkpoint's WeightsError.
LOAD_ERRORS = (WeightsError, pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError, zipfile.BadZipFile)
HINT = "written by `anomalib train --model anomalib_dsr.Dsr` or `anomalib-dsr demo`"


def load_dsr_checkpoint(ckpt: str | Path) -> Dsr:
    """The ``Dsr`` of a Lightning checkpoint, read with ``weights_only=True`` (no pickled code runs), on the CPU,
    in eval mode. Raises :class:`WeightsError` naming the file for a missing or unloadable one."""
    ckpt = Path(ckpt)
    try:
        model = Dsr.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        state = "is a folder" if ckpt.is_dir() else "does not exist"
        msg = f"Checkpoint {ckpt} {state}: give a .ckpt of anomalib_dsr.Dsr {HINT}."
        raise WeightsError(msg) from None
    except LOAD_ERRORS as error:
        reason = str(error).splitlines()[0]
        msg = f"{ckpt} is not a loadable Lightning checkpoint of anomalib_dsr.Dsr ({reason}); give one {HINT}."
        raise WeightsError(msg) from None
    return model.eval()
