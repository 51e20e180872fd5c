"""HU as a scan file stores them: integer types (int16 CT) hold rounded, clipped values.

Every output that keeps its source's integer type (protect.py, tamper.py, the evaluation's
"what a hospital would store") rounds half to even and clips to the type's range here.
"""
from __future__ import annotations

import numpy as np


def int_limits(dtype) -> tuple[int, int] | None:
    """(min, max) of an integer dtype; None for floats (nothing to round or clip)."""
    if not np.issubdtype(np.dtype(dtype), np.integer):
        return None
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def stored_as(hu, dtype) -> np.ndarray:
    """`hu` as an array of `dtype`: rounded and clipped to its range when it is an integer type."""
    hu = np.asarray(hu)
    lim = int_limits(dtype)
    if lim is not None:
        hu = np.clip(np.rint(hu), *lim)
    return hu.astype(dtype, copy=False)
