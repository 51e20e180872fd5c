"""A scan as NumPy: `<name>.npy` (HU, z, y, x) plus `<name>.json` with the geometry."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from utils.atomic import atomic_path, atomic_write_text
from utils.errors import InputFileError, ScanFormatError
from utils.scan import Scan, check_scan, check_writable, disk_array, hu_array
from utils.scan_headers import precheck_npy
from utils.scan_paths import refuse_overwrite


def _geometry_json(scan: Scan, dtype) -> dict:
    return {
        "shape_zyx": [int(v) for v in scan.hu.shape],
        "spacing_zyx": [float(v) for v in scan.spacing],
        "origin_zyx": [float(v) for v in scan.origin],
        "direction_zyx": [[float(v) for v in r] for r in np.asarray(scan.direction)],
        "dtype": str(np.dtype(dtype)),
        "units": "HU",
        "axis_order": "z,y,x",
    }


def save_numpy(scan: Scan, path: str | os.PathLike) -> Path:
    """Write HU as `.npy` plus `<name>.json` with the geometry (both atomically)."""
    path = Path(path)
    if path.suffix.lower() != ".npy":
        path = path.with_name(path.name + ".npy")
    check_writable(scan, path)
    refuse_overwrite(path, scan.source_path)
    arr = disk_array(scan.hu)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)
    atomic_write_text(
        path.with_suffix(".json"), json.dumps(_geometry_json(scan, arr.dtype), indent=2) + "\n"
    )
    return path


def _numbers(side: Path, geo: dict, key: str, shape: tuple, default):
    """geo[key] as finite floats of `shape`, or `default` when absent."""
    if key not in geo:
        return default
    v = geo[key]
    flat = (
        v
        if shape == (3,)
        else (sum(v, []) if isinstance(v, list) and all(isinstance(r, list) for r in v) else None)
    )
    ok = (
        isinstance(v, list)
        and len(v) == shape[0]
        and isinstance(flat, list)
        and len(flat) == math.prod(shape)
        and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            for x in flat
        )
    )
    if not ok:
        want = "three numbers" if shape == (3,) else "3 rows of 3 numbers"
        raise ScanFormatError(f"{side}: '{key}' must be {want}, got {json.dumps(v)[:80]}")
    return np.asarray(v, dtype=np.float64)


def _read_sidecar(side: Path, shape: tuple) -> dict:
    try:
        geo = json.loads(side.read_text())
    except (ValueError, OSError) as e:
        raise ScanFormatError(
            f"{side}: bad geometry sidecar ({str(e).splitlines()[0][:200]})"
        ) from None
    if not isinstance(geo, dict):
        raise ScanFormatError(
            f"{side}: bad geometry sidecar (a JSON object is needed, got {type(geo).__name__})"
        )
    if "shape_zyx" in geo and geo["shape_zyx"] != list(shape):
        raise ScanFormatError(
            f"{side}: 'shape_zyx' {json.dumps(geo['shape_zyx'])[:80]} is not the array's {list(shape)}"
        )
    return {
        "spacing": _numbers(side, geo, "spacing_zyx", (3,), (1.0, 1.0, 1.0)),
        "origin": _numbers(side, geo, "origin_zyx", (3,), (0.0, 0.0, 0.0)),
        "direction": _numbers(side, geo, "direction_zyx", (3, 3), np.eye(3)),
    }


def load_numpy(path: str | os.PathLike) -> Scan:
    """Read what save_numpy wrote (.npy + .json sidecar; without the sidecar: 1 mm, origin 0)."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    _, shape, _ = precheck_npy(path)
    side = path.with_suffix(".json")
    geo = _read_sidecar(side, shape) if side.exists() else {}
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ScanFormatError(
            f"{path}: not a NumPy array file ({str(e).splitlines()[0]})"
        ) from None
    scan = Scan(
        hu=arr,
        source_path=str(path),
        **({"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0)} | geo),
    )
    check_scan(scan, path, side if side.exists() else path)
    scan.hu = hu_array(arr)
    return scan
