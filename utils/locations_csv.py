"""The one reader of location CSVs: `filename,z,y,x[,coord]` rows (docs/data.md#location-files).

prepare_data writes them (nodules.csv, healthy.csv); protect.py --targets, evaluate.py
--locations csv, CT-GAN's dataset builder and its demo read them through `read_locations_csv`.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np

from utils.errors import InputFileError


class LocationRow(NamedTuple):
    filename: str | None          # as written (None when the column is absent or empty)
    zyx: np.ndarray               # (z, y, x) floats, in voxels or world mm
    world: bool                   # coord column says "world" (else voxels)
    line: int                     # line in the file, for messages


def read_locations_csv(path, *, what: str = "locations", need_filename: bool = False,
                       skip_blank: bool = False) -> list[LocationRow]:
    """Every row of a location CSV. `what` names the file in messages ("targets", ...).
    `skip_blank` skips rows with an empty z, y or x (CT-GAN's published builder does); else
    they are refused. Missing, empty, header-less or malformed files raise InputFileError."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: {what} CSV not found")
    need = ("filename", "z", "y", "x") if need_filename else ("z", "y", "x")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = [c.strip().lower() for c in (reader.fieldnames or [])]
            missing = [c for c in need if c not in fields]
            if missing:
                got = ",".join(fields) or "an empty file"
                raise InputFileError(f"{path}: a {what} CSV needs a header with "
                                     f"{','.join(need)} columns: missing column(s) "
                                     f"{', '.join(missing)} (got {got})")
            rows = [r for n, raw in enumerate(reader, start=2)
                    if (r := _row(path, what, n, raw, skip_blank)) is not None]
            if need_filename and any(r.filename is None for r in rows):
                n = next(r.line for r in rows if r.filename is None)
                raise InputFileError(f"{path}: line {n}: empty filename in a {what} CSV")
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputFileError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None
    if not rows:
        raise InputFileError(f"{path}: no {what} (the CSV has no rows)")
    return rows


def _row(path: Path, what: str, n: int, raw: dict, skip_blank: bool) -> LocationRow | None:
    row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()
           if not isinstance(v, list)}
    if skip_blank and not all(row.get(c) for c in ("z", "y", "x")):
        return None
    try:
        zyx = np.array([float(row["z"]), float(row["y"]), float(row["x"])])
    except ValueError:
        raise InputFileError(f"{path}: line {n}: z,y,x must be numbers, got "
                             f"{row.get('z')!r},{row.get('y')!r},{row.get('x')!r}") from None
    system = (row.get("coord") or "vox").lower()
    if system not in ("vox", "world") or not np.all(np.isfinite(zyx)):
        raise InputFileError(f"{path}: line {n}: coord must be vox or world and z,y,x finite "
                             f"in a {what} CSV")
    return LocationRow(row.get("filename") or None, zyx, system == "world", n)
