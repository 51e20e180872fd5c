"""Tamper locations for the evaluation, drawn from a stream training never uses (EVAL_STREAM):
in-lung voxels, the folder's location CSVs, or held-out offsets around known findings; and the
32 mm cube a tamper at a location changes (docs/results.md)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from procedures.protection.targeted import offset_grid, targets_for_scan
from scanDataset import VolumeItem
from utils.cubes import cube_bounds
from utils.errors import InputFileError, MitsError, UsageError
from utils.locations_csv import read_locations_csv
from utils.lung import lung_mask
from utils.resample import scaled_shape


CUBE_MM = 32.0  # CT-GAN's cube side (docs/attack.md#cube-geometry)


@dataclass
class Location:
    scan: str
    z: int
    y: int
    x: int
    action: str
    source: str          # "lung mask" or the CSV's name

    @property
    def vox(self) -> tuple[int, int, int]:
        return (self.z, self.y, self.x)


def _csv_locations(item: VolumeItem, path: Path) -> list[tuple[int, int, int]]:
    """Rows of a project CSV (filename, z, y, x[, coord vox|world]) for this scan, as voxels."""
    name = Path(item.path).name
    out = []
    for row in read_locations_csv(path, need_filename=True):
        if Path(row.filename).name != name:
            continue
        c = item.scan.world2vox(row.zyx) if row.world else row.zyx
        v = tuple(int(np.floor(t)) for t in c)
        if all(0 <= t < s for t, s in zip(v, item.scan.hu.shape)):
            out.append(v)
    return out


# Evaluation draws come from their own stream: train.py seeds every step with
# SeedSequence([seed, step, rank]); this tag as the first entropy word keeps evaluation
# locations independent of anything training drew (docs/results.md).
EVAL_STREAM = 0x4D455641


def target_locations(
    item: VolumeItem, rows, n: int, rng, actions, radius: int = 2
) -> list[Location]:
    """Held-out cube centres around the targets: n offsets per target within +-radius voxels,
    drawn without replacement from the offsets of odd parity ((oz + oy + ox) odd), which the
    targeted protection under evaluation never optimises for (it uses the even ones)."""
    name = Path(item.path).name
    grid = offset_grid(radius, parity=1)
    hi = np.asarray(item.scan.hu.shape) - 1
    out = []
    for t in targets_for_scan(rows, item.scan, name, strict=False):
        offs = grid[rng.choice(len(grid), size=min(n, len(grid)), replace=False)]
        for o in offs:
            v = tuple(int(c) for c in np.clip(np.asarray(t) + o, 0, hi))
            out += [Location(name, *v, action=a, source=f"target {t} + {tuple(int(c) for c in o)}")
                    for a in actions]
    return out


def sample_locations(item: VolumeItem, n: int, *, seed: int = 0, mode: str = "lung",
                     actions: Sequence[str] = ("inject", "remove"), csv_dir=None,
                     targets=None) -> list[Location]:
    """N tamper locations for one scan, each tampered with every action, drawn from the
    evaluation stream (EVAL_STREAM, seed, scan name).

    mode "lung": N voxels drawn from utils.lung.lung_mask, preferring centres whose 32 mm cube
    stays inside the scan along z.
    mode "csv": inject at the folder's healthy.csv rows, remove at its nodules.csv rows (at most
    N each, seeded choice): the attacker injects into healthy lung and removes a real nodule.
    mode "targets": N held-out offsets around each target row (procedures.protection.targeted rows) of
    this scan (target_locations): a hand-placed attack on a known finding."""
    name = Path(item.path).name
    rng = np.random.default_rng([EVAL_STREAM, int(seed), zlib.crc32(name.encode())])
    if mode == "targets":
        if targets is None:
            raise UsageError("location mode 'targets' needs the targets CSV rows")
        return target_locations(item, targets, n, rng, actions)
    if mode == "csv":
        folder = Path(csv_dir) if csv_dir is not None else Path(item.path).parent
        out = []
        for action, fname in (("inject", "healthy.csv"), ("remove", "nodules.csv")):
            if action not in actions:
                continue
            p = folder / fname
            if not p.is_file():
                raise InputFileError(f"{p}: not found (needed by --locations csv)")
            rows = _csv_locations(item, p)
            if len(rows) > n:
                rows = [rows[i] for i in sorted(rng.choice(len(rows), n, replace=False))]
            out += [Location(name, *v, action=action, source=fname) for v in rows]
        return out
    if mode != "lung":
        raise UsageError(f"unknown location mode {mode!r}; choose lung, csv or targets")
    cand = lung_candidates(item.scan.hu, item.scan.spacing, n, item.path)
    picks = cand[rng.choice(len(cand), size=min(n, len(cand)), replace=False)]
    return [Location(name, int(z), int(y), int(x), action=a, source="lung mask")
            for z, y, x in picks for a in actions]


def lung_candidates(hu: np.ndarray, spacing, n: int = 1, name="the scan") -> np.ndarray:
    """In-lung voxels (utils.lung.lung_mask) as (k, 3) z, y, x, only those whose 32 mm cube stays
    inside the scan along z when there are at least n of them."""
    cand = np.argwhere(lung_mask(hu))
    if len(cand) == 0:
        raise MitsError(f"{name}: no lung found (utils.lung.lung_mask is empty); "
                        f"use --locations csv")
    half = int(scaled_shape([CUBE_MM], 1.0 / np.asarray(spacing, np.float64)[0])[0]) // 2
    inner = cand[(cand[:, 0] >= half) & (cand[:, 0] < hu.shape[0] - half)]
    return inner if len(inner) >= n else cand


def cube_region(spacing, center, vol_shape) -> tuple[slice, slice, slice]:
    """The 32 mm cube around `center` (CT-GAN's cut: round(32 / spacing) voxels), clipped."""
    shape = scaled_shape([CUBE_MM] * 3, 1.0 / np.asarray(spacing, dtype=np.float64))
    _, _, a, b = cube_bounds(center, np.maximum(shape, 1), vol_shape)
    return tuple(slice(int(lo), int(hi)) for lo, hi in zip(a, b))
