"""CT-GAN training-set builder (docs/ctgan-training.md).

From a CSV of locations (filename,z,y,x[,coord]) and the scans it names: cut a cube of
round((32 + 8) / spacing) voxels per location (pad -1000 HU), resample it to 1 mm (40^3),
augment it into 67 variants, centre-crop every variant to 32^3, fit the histogram equaliser
on all of them, equalise, and normalise v' = (v - mean) / (max - min).

Like the published builder, we cut each cube first and then resample the cube (the published
whole-scan resample line is commented out). Differences (docs/fidelity.md): `exact_resample`
(default) gives exactly 40^3 for any spacing where the published zoom gives e.g. 39 slices at
3 mm; and our samples are float HU, where the published ones stay integer HU (int16 cubes
through SciPy's zoom, shift and rotate, which round) except cubes that needed padding
(`integer_hu=True` restores that).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import scipy.ndimage
from tqdm import tqdm

from utils.cubes import cut_cube
from utils.equalizer import HistEqualizer
from utils.errors import CoordinateError, InputFileError
from utils.scan import check_coord
from utils.locations_csv import read_locations_csv
from utils.resample import resample_exact, scale_published
from utils.scan_io import load_scan

CUBE = 32            # voxels per axis at 1 mm
MARGIN = 8           # extra border cut for the augmentations, cropped away afterwards
MASK = (6, 26)       # in-painting region on every axis
SHIFTS = ((0, 4, 4), (0, -4, 4), (0, 4, -4), (0, -4, -4))
ANGLES = tuple(range(6, 360, 6))           # 59 rotations in the y-x plane
N_AUG = 1 + 3 + len(SHIFTS) + len(ANGLES)  # 67 (the CT-GAN README says 66)
PAD_HU = -1000.0


class TrainingSet(NamedTuple):
    samples: np.ndarray          # (N, 32, 32, 32, 1) float32, equalised and normalised
    equalizer: HistEqualizer
    normalization: np.ndarray    # [mean, min, max] of the equalised set, float64


class Location(NamedTuple):
    path: Path
    center: np.ndarray   # (z, y, x) as written in the CSV
    coord: str           # 'vox' or 'world'
    row: int             # 1-based data row in the CSV, for error messages


# --- locations ------------------------------------------------------------------------------
def read_locations(csv_path) -> list[Location]:
    """The locations CSV's rows; `filename` is relative to the CSV's folder. Rows without a
    coordinate are skipped, as the published builder does."""
    csv_path = Path(csv_path)
    rows = read_locations_csv(csv_path, need_filename=True, skip_blank=True)
    return [Location(csv_path.parent / r.filename, r.zyx, "world" if r.world else "vox", r.line - 1)
            for r in rows]


# --- one location -> 67 cubes ---------------------------------------------------------------
def extract_cube(hu: np.ndarray, spacing, center_vox, exact_resample: bool = True,
                 integer_hu: bool = False) -> np.ndarray:
    """Cut round(40 / spacing) voxels around `center_vox` (pad -1000) and resample to 1 mm.

    exact_resample=True gives exactly 40^3 for any spacing; False is the published zoom,
    which gives e.g. 39 slices at 3 mm. Float32, or with `integer_hu` int16 as published
    when the cut needed no padding (the published padded cut is float64).
    """
    from procedures.attacker.pipeline import (
        published_cut_pads,
    )  # lazy: it pulls scipy.stats (ctgan_train --help)

    spacing = np.asarray(spacing, dtype=np.float64)
    size = np.round((CUBE + MARGIN) / spacing).astype(np.int64)
    dtype = np.float32
    if integer_hu and not published_cut_pads(
        hu.shape, np.asarray(center_vox).astype(np.int64), size
    ):
        dtype = np.int16
    cube = cut_cube(hu, center_vox, size, pad_value=PAD_HU).astype(dtype)
    if exact_resample:
        return resample_exact(cube, (CUBE + MARGIN,) * 3)
    return scale_published(cube, spacing)


def augment(x0: np.ndarray) -> np.ndarray:
    """The 67 published variants of one cube, stacked (67, *x0.shape): int16 for an int16
    cube (SciPy rounds each variant, as published), else float32.

    Order: original; flips on axis 1, axis 2, both; shifts (0,+-4,+-4) (constant fill,
    cval 0 as published: the filled border is cropped away); rotations in the y-x plane
    every 6 degrees from 6 to 354 (reflect padding, shape kept).
    """
    if x0.dtype != np.int16:
        x0 = np.asarray(x0, dtype=np.float32)
    out = np.empty((N_AUG,) + x0.shape, dtype=x0.dtype)
    out[0] = x0
    out[1] = x0[:, ::-1, :]
    out[2] = x0[:, :, ::-1]
    out[3] = x0[:, ::-1, ::-1]
    for i, s in enumerate(SHIFTS):
        scipy.ndimage.shift(x0, s, output=out[4 + i], mode="constant", cval=0.0)
    # scipy's per-plane rotate beats one vectorised 3-D map_coordinates over all 59 angles
    # (16 spline taps per voxel instead of 64): ~0.45 s per 40^3 cube.
    base = 4 + len(SHIFTS)
    for i, ang in enumerate(ANGLES):
        scipy.ndimage.rotate(
            x0, ang, axes=(1, 2), reshape=False, mode="reflect", output=out[base + i]
        )
    return out


def centre_crop(cubes: np.ndarray, size: int = CUBE) -> np.ndarray:
    """Crop (n, d, h, w) to (n, size, size, size) about each cube's centre (utils.cubes rule).

    Cubes smaller than `size` (published resampling) are padded with -1000.
    """
    cubes = np.asarray(cubes)
    center = np.asarray(cubes.shape[1:]) // 2
    if all(s >= size for s in cubes.shape[1:]):
        start = center - size // 2
        sl = tuple(slice(int(a), int(a) + size) for a in start)
        return np.ascontiguousarray(cubes[(slice(None),) + sl])
    return np.stack([cut_cube(c, center, size, pad_value=PAD_HU) for c in cubes])


def location_samples(hu, spacing, center_vox, exact_resample: bool = True,
                     integer_hu: bool = False) -> np.ndarray:
    """(67, 32, 32, 32) float32 HU samples for one location."""
    x0 = extract_cube(hu, spacing, center_vox, exact_resample, integer_hu)
    return centre_crop(augment(x0)).astype(np.float32, copy=False)


# --- equalise + normalise ---------------------------------------------------------------------
def normalize(v, norm) -> np.ndarray:
    mean, vmin, vmax = (float(a) for a in norm)
    return (v - mean) / (vmax - vmin)


def denormalize(v, norm) -> np.ndarray:
    mean, vmin, vmax = (float(a) for a in norm)
    return v * (vmax - vmin) + mean


def equalize_and_normalize(samples_hu: np.ndarray):
    """Fit the equaliser on all samples; return (normalised float32, equaliser, [mean,min,max])."""
    eq = HistEqualizer.fit(samples_hu)
    e = eq.equalize(samples_hu)  # float64
    norm = np.array([e.mean(), e.min(), e.max()], dtype=np.float64)
    if norm[2] <= norm[1]:
        raise InputFileError("all training samples are identical: cannot normalise")
    return normalize(e, norm).astype(np.float32), eq, norm


# --- the whole set ----------------------------------------------------------------------------
def build_training_set(csv_path, exact_resample: bool = True, progress: bool = True,
                       loader: Callable | None = None, integer_hu: bool = False) -> TrainingSet:
    """Build CT-GAN's training set from a locations CSV (docs/ctgan-training.md).

    `loader(path) -> utils.scan_io.Scan` defaults to utils.scan_io.load_scan; each scan is
    read once however many locations it has.
    """
    if loader is None:
        loader = load_scan
    locs = read_locations(csv_path)
    cache: dict[Path, object] = {}
    parts = []
    for loc in tqdm(locs, desc="cutting + augmenting", unit="loc", disable=not progress):
        scan = cache.get(loc.path)
        if scan is None:
            scan = cache[loc.path] = loader(loc.path)
        vox = scan.world2vox(loc.center) if loc.coord == "world" else loc.center
        try:
            check_coord(vox, scan.shape)
        except CoordinateError as e:
            where = f"{csv_path}: row {loc.row} ({loc.coord}, {loc.path.name})"
            raise CoordinateError(f"{where}: {e}") from None
        parts.append(location_samples(scan.hu, scan.spacing, vox, exact_resample, integer_hu))
    samples = np.concatenate(parts)
    x, eq, norm = equalize_and_normalize(samples)
    return TrainingSet(x[..., None], eq, norm)


def save_preprocessing(model_dir, equalizer: HistEqualizer, normalization) -> None:
    """Write equalization.npz (our safe format) and normalization.npy next to the model."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    equalizer.save(model_dir / "equalization.npz")
    tmp = model_dir / "normalization.tmp.npy"
    np.save(tmp, np.asarray(normalization, dtype=np.float64))
    os.replace(tmp, model_dir / "normalization.npy")
