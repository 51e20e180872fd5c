"""ScanDataset: the CT volumes of a folder, normalised as the published code does.

Each item is one volume (as published, a loader batch is one volume: docs/training.md#data), min-max normalised
over the whole volume to [-1, 1], with what is needed to map back to HU exactly:
    hu = (v + 1) / 2 * (hu_max - hu_min) + hu_min.
The folder may hold `.mhd` files (the published loader reads only those), NRRD files, and DICOM
series (one sub-folder per series). Scans are read once and kept in memory (the published
loop re-reads the scan from disk for every eligible sub-batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.errors import InputFileError
from utils.hu_range import to_hu, to_net
from utils.scan_io import Scan, load_scan
from utils.scan_paths import SCAN_SUFFIXES, is_scan_name

__all__ = ["SCAN_SUFFIXES", "ScanDataset", "VolumeItem", "list_scans", "normalise", "to_hu"]


def list_scans(folder, mhd_only: bool = False) -> list[Path]:
    """Scan files and DICOM-series folders directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(f"{folder}: data folder not found")
    found = []
    try:
        for p in sorted(folder.iterdir()):
            name = p.name.lower()
            if p.is_file() and (name.endswith(".mhd") if mhd_only else is_scan_name(name)):
                found.append(p)
            elif p.is_dir() and not mhd_only and any(q.suffix.lower() == ".dcm" or q.suffix == ""
                                                     for q in p.iterdir() if q.is_file()):
                found.append(p)
    except OSError as e:  # an unreadable sub-folder (mode 000) is one line, not a traceback
        raise InputFileError(f"{e.filename or folder}: cannot read ({e.strerror})") from None
    if not found:
        names = ", ".join(SCAN_SUFFIXES)
        raise InputFileError(f"{folder}: no scans ({names} files or DICOM series folders)")
    return found


@dataclass
class VolumeItem:
    volume: torch.Tensor      # (D, H, W) in [-1, 1]
    hu_min: float
    hu_max: float
    index: int
    path: str
    scan: Scan                # HU and geometry (the source of exports)

    def to_hu(self, v: torch.Tensor | np.ndarray):
        return to_hu(v, self.hu_min, self.hu_max)


def normalise(hu: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Per-volume min-max to [-1, 1] (float64 arithmetic, as published)."""
    lo, hi = float(hu.min()), float(hu.max())
    return to_net(hu.astype(np.float64), lo, hi), lo, hi


class ScanDataset(torch.utils.data.Dataset):
    def __init__(self, folder, dtype: torch.dtype = torch.float32, mhd_only: bool = False,
                 cache: bool = True):
        self.paths = list_scans(folder, mhd_only=mhd_only)
        self.dtype = dtype
        self.cache = cache
        self._items: dict[int, VolumeItem] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> VolumeItem:
        if i in self._items:
            return self._items[i]
        scan = load_scan(self.paths[i])
        v, lo, hi = normalise(scan.hu)
        item = VolumeItem(torch.from_numpy(v).to(self.dtype), lo, hi, i, str(self.paths[i]), scan)
        if self.cache:
            self._items[i] = item
        return item
