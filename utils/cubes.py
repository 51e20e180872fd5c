"""Cut and paste axis-aligned cubes of a (z, y, x) volume, padding where they leave it."""
from __future__ import annotations

import numpy as np


def cube_bounds(center, shape, vol_shape):
    """Start/stop of a cube of `shape` centred at voxel `center`, and the part inside the volume.

    CT-GAN's convention (its utils.cutCube/pasteCube): the centre is truncated to int and
    start = centre - round(shape / 2) with NumPy's round-half-to-even (shape 13 -> 6, 7 -> 4).

    Returns (start, stop, inner_start, inner_stop) as int arrays in volume coordinates.
    """
    center = np.asarray(center).astype(np.int64)
    shape = np.asarray(shape, dtype=np.int64)
    start = center - np.round(shape / 2).astype(np.int64)
    stop = start + shape
    inner_start = np.clip(start, 0, np.asarray(vol_shape))
    inner_stop = np.clip(stop, 0, np.asarray(vol_shape))
    return start, stop, inner_start, inner_stop


def cut_cube(vol: np.ndarray, center, shape, pad_value: float = -1000.0) -> np.ndarray:
    """Copy of the cube of `shape` centred at `center`; voxels outside `vol` get `pad_value`.

    CT-GAN pads with 0 HU in the attack and -1000 HU when building training samples
    (docs/attack.md#cube-geometry); callers choose.
    """
    shape = tuple(int(s) for s in np.broadcast_to(np.asarray(shape), (3,)))
    start, stop, a, b = cube_bounds(center, shape, vol.shape)
    out = np.full(shape, pad_value, dtype=vol.dtype)
    if np.all(b > a):
        src = tuple(slice(int(lo), int(hi)) for lo, hi in zip(a, b))
        dst = tuple(slice(int(lo - s0), int(hi - s0)) for lo, hi, s0 in zip(a, b, start))
        out[dst] = vol[src]
    return out


def paste_cube(vol: np.ndarray, cube: np.ndarray, center) -> tuple[slice, slice, slice]:
    """Write `cube` into `vol` (in place) centred at `center`; parts outside `vol` are dropped.

    Returns the slices of `vol` that were written (empty slices if none).
    """
    start, stop, a, b = cube_bounds(center, cube.shape, vol.shape)
    b = np.maximum(a, b)
    dst = tuple(slice(int(lo), int(hi)) for lo, hi in zip(a, b))
    src = tuple(slice(int(lo - s0), int(hi - s0)) for lo, hi, s0 in zip(a, b, start))
    if np.all(b > a):
        vol[dst] = cube[src].astype(vol.dtype, copy=False)
    return dst
