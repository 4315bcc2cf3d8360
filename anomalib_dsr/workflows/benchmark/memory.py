"""glibc's mmap threshold, set through ``ctypes`` while PatchCore's coreset selection runs (it fragments the heap)."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# glibc's mallopt() parameter of the mmap threshold, and the most its dynamic threshold rises to (64-bit).
M_MMAP_THRESHOLD = -3
GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or ``None`` on other C libraries and systems."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), "mallopt", None)
    except OSError:  # not glibc (e.g. musl)
        return None


@contextmanager
def large_allocations_mapped(threshold: int = 1 << 20) -> Iterator[None]:
    """On glibc, every allocation of ``threshold`` bytes or more gets its own mmap while the block runs.

    anomalib's k-center-greedy coreset (PatchCore's fit) allocates and frees an N x d temporary per selected point.
    Once glibc's dynamic mmap threshold has risen (after any large free, as in a process that ran other jobs or
    extracted features before), these temporaries come from the heap and fragment it: on the demo dataset about
    20 MB stayed allocated per selected point, tens of GB for a coreset of 2,048 points. Afterwards the threshold
    is set to glibc's dynamic maximum (setting it switches the dynamic threshold off for good).
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
