"""Resampling of cubes between scan spacing and CT-GAN's 1 mm grid (docs/attack.md#exact-resampling)."""

from __future__ import annotations

import numpy as np
import scipy.ndimage


def scaled_shape(shape, factor) -> np.ndarray:
    """CT-GAN's get_scaled_shape: round(shape * factor) per axis (ints)."""
    return np.round(
        np.asarray(shape, dtype=np.float64) * np.asarray(factor, dtype=np.float64)
    ).astype(np.int64)


def scale_published(cube: np.ndarray, factor) -> np.ndarray:
    """CT-GAN's scale_scan: zoom by round(shape * factor) / shape, cubic spline, mode nearest.

    With thick slices the result is not 32^3 (5 mm: 6 slices -> 30 mm), which is why the
    published attack cannot tamper 5 mm scans (docs/attack.md#exact-resampling).
    """
    new_shape = scaled_shape(cube.shape, factor)
    real_factor = new_shape / np.asarray(cube.shape, dtype=np.float64)
    return scipy.ndimage.zoom(cube, real_factor, mode="nearest")


def resample_exact(cube: np.ndarray, shape) -> np.ndarray:
    """Cubic-spline zoom to exactly `shape` (our default: any slice spacing reaches 32^3)."""
    shape = tuple(int(s) for s in shape)
    if tuple(cube.shape) == shape:
        return cube.copy()
    factor = np.asarray(shape, dtype=np.float64) / np.asarray(cube.shape, dtype=np.float64)
    out = scipy.ndimage.zoom(cube, factor, mode="nearest")
    if out.shape != shape:  # scipy rounds the output shape; guard float edge cases
        raise AssertionError(f"zoom gave {out.shape}, wanted {shape}")
    return out
