"""The Scan type and the checks every reader applies to what it read.

Conventions: every array and every geometry vector is in
(z, y, x) order. `direction` is the 3x3 direction-cosine matrix in that same order, so
world_zyx = origin + direction @ (spacing * voxel_zyx).
SimpleITK speaks (x, y, z): spacing/origin are reversed and direction_zyx = D_xyz[::-1, ::-1].
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from utils.errors import CoordinateError, ScanFormatError

_INT16 = np.iinfo(np.int16)
# CT numbers: air is -1000 HU, dense metal with an extended CT scale reaches about +30000 HU.
# Outside the int16 range nothing is a Hounsfield unit: typically a header that names the wrong
# voxel type (ushort for short puts air at 64536).
HU_RANGE = (float(_INT16.min), float(_INT16.max))
# Voxel sizes a CT can have, in mm: micro-CT reaches about 0.05 mm, the thickest clinical slices
# are 10 mm, and a scout or a badly-converted header can claim more. Outside this range a
# spacing is a broken header (1e300 mm, 1e-9 mm) that world coordinates and CT-GAN's resampling
# to 1 mm would silently turn into garbage.
SPACING_MM = (0.05, 50.0)


@dataclass
class Scan:
    hu: np.ndarray                      # (z, y, x) Hounsfield units, int16 or float
    spacing: np.ndarray                 # (z, y, x) mm
    origin: np.ndarray                  # (z, y, x) mm, world position of voxel (0, 0, 0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))  # (z, y, x) cosines
    source_path: str | None = None
    # Per-slice pydicom Datasets (pixel data removed) when read from DICOM: the metadata
    # that a written DICOM series copies (patient, study, equipment).
    dicom_headers: list[Any] | None = None

    def __post_init__(self):
        self.spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        self.origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    def world2vox(self, world) -> np.ndarray:
        return world2vox(world, self.spacing, self.origin, self.direction)

    def vox2world(self, vox) -> np.ndarray:
        return vox2world(vox, self.spacing, self.origin, self.direction)


def world2vox(world, spacing, origin, direction=None) -> np.ndarray:
    """vox = inverse(direction @ diag(spacing)) @ (world - origin), all (z, y, x). Float result."""
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    m = direction @ np.diag(np.asarray(spacing, dtype=np.float64))
    w = np.asarray(world, dtype=np.float64) - np.asarray(origin, dtype=np.float64)
    return np.linalg.solve(m, w.T).T if w.ndim > 1 else np.linalg.solve(m, w)


def vox2world(vox, spacing, origin, direction=None) -> np.ndarray:
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    m = direction @ np.diag(np.asarray(spacing, dtype=np.float64))
    v = np.asarray(vox, dtype=np.float64)
    return (m @ v.T).T + np.asarray(origin, dtype=np.float64)


def hu_array(values: np.ndarray) -> np.ndarray:
    """HU as int16 when that is exact (integral values inside the int16 range), else float32."""
    a = np.asarray(values)
    if a.dtype == np.int16:
        return a
    if a.size == 0:
        return a.astype(np.int16)
    if np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_):
        lo, hi = a.min(), a.max()
        return a.astype(np.int16) if lo >= _INT16.min and hi <= _INT16.max else a.astype(np.float32)
    a64 = a.astype(np.float64, copy=False)
    lo, hi = a64.min(), a64.max()
    if lo >= _INT16.min and hi <= _INT16.max and np.array_equal(a64, np.round(a64)):
        return a64.astype(np.int16)
    return a.astype(np.float32)


def check_finite(hu: np.ndarray, path) -> None:
    if np.issubdtype(hu.dtype, np.floating) and not np.isfinite(hu).all():
        n = int((~np.isfinite(hu)).sum())
        raise ScanFormatError(f"{path}: {n} voxels are NaN or infinite; not a usable CT scan")


def check_volume(hu: np.ndarray, path) -> None:
    """A 3-D array of plain numbers. One slice is a volume (a single-slice series): operations
    that need more (the generator's slabs, CT-GAN's cube) refuse it with check_min_size."""
    kind = np.asarray(hu).dtype.kind
    if kind == "b":
        raise ScanFormatError(f"{path}: holds true/false values (a mask), not CT Hounsfield units")
    if kind not in "iuf":
        raise ScanFormatError(f"{path}: holds {np.asarray(hu).dtype} values; a CT scan is numbers")
    if hu.ndim != 3:
        raise ScanFormatError(f"{path}: is a {hu.ndim}-D image, a 3-D CT volume is needed")
    if min(hu.shape) < 1:
        raise ScanFormatError(f"{path}: empty image of shape {hu.shape}")


def check_hu_range(hu: np.ndarray, path) -> None:
    """Values no CT scanner produces are refused: protecting them would silently turn a wrong
    voxel type or rescale into a 'protected' scan."""
    if hu.dtype == np.int16 or hu.size == 0:  # int16 cannot leave the range: no pass over it
        return
    lo, hi = float(np.min(hu)), float(np.max(hu))
    if lo < HU_RANGE[0] or hi > HU_RANGE[1]:
        raise ScanFormatError(
            f"{path}: values {lo:.6g} to {hi:.6g} are not CT Hounsfield units (CT spans about -1024 to "
            f"+30000 HU); is the voxel type or the rescale in the header right?"
        )


def check_not_a_mask(hu: np.ndarray, path) -> None:
    """A CT whose values all lie in 0..1 (and are not all equal) is a mask or a normalised
    image, not Hounsfield units: in HU that range is a sliver of water, never a whole scan.
    load_scan applies it to every CT; a label map (load_scan(label=True)) is exempt."""
    if hu.size and 0.0 <= float(np.min(hu)) < float(np.max(hu)) <= 1.0:
        raise ScanFormatError(f"{path}: every value lies in 0..1 (a mask or a normalised image), "
                              f"not CT Hounsfield units")


def check_geometry(spacing, origin, direction, path) -> None:
    """Positive finite spacing, finite origin, unit in-plane axes at right angles and a slice
    axis that leaves the plane: the geometry every writer (DICOM included) can store and
    world2vox can invert. Checked at read time, before any work."""
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    og = np.asarray(origin, dtype=np.float64).reshape(-1)
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if sp.shape != (3,) or not np.isfinite(sp).all() or (sp <= 0).any():
        raise ScanFormatError(
            f"{path}: spacing {sp.tolist()} mm; each value must be a positive number"
        )
    if (sp < SPACING_MM[0]).any() or (sp > SPACING_MM[1]).any():
        shown = [float(f"{v:.6g}") for v in sp]
        lo, hi = SPACING_MM
        raise ScanFormatError(f"{path}: spacing (z, y, x) {shown} mm is not a CT voxel size (each "
                              f"value must lie in {lo:g}..{hi:g} mm)")
    if og.shape != (3,) or not np.isfinite(og).all():
        raise ScanFormatError(f"{path}: origin {og.tolist()} is not three finite numbers")
    if not np.isfinite(d).all():
        raise ScanFormatError(f"{path}: direction cosines are not finite")
    y, x, z = d[:, 1], d[:, 2], d[:, 0]  # columns: index axes z, y, x
    unit = np.allclose([np.linalg.norm(x), np.linalg.norm(y), np.linalg.norm(z)], 1.0, atol=1e-3)
    if not unit or abs(float(x @ y)) > 1e-3:
        raise ScanFormatError(f"{path}: direction cosines are not unit vectors with row and column "
                              f"axes at right angles ({np.round(d, 4).tolist()})")
    if abs(float(np.linalg.det(d))) < 1e-2:
        raise ScanFormatError(f"{path}: the slice axis lies in the image plane (singular geometry)")


def check_scan(scan: Scan, path, geometry_path=None) -> Scan:
    """Every check a freshly read scan passes before anything uses it (`geometry_path`: the
    file the geometry came from, when another one)."""
    check_volume(scan.hu, path)
    check_finite(scan.hu, path)
    check_hu_range(scan.hu, path)
    check_geometry(scan.spacing, scan.origin, scan.direction, geometry_path or path)
    return scan


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get (MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(n_voxels: int, bytes_per_voxel: int, path) -> None:
    """Refuse a declared size that cannot fit before any byte of it is read: a 4 KB header
    claiming 1500^3 voxels must fail with one line, not take all memory or be killed. Counts
    the file's voxels plus the float32 HU copy the readers make."""
    need = int(n_voxels) * (int(bytes_per_voxel) + 4)
    avail = available_memory()
    if avail is not None and need > avail:
        raise ScanFormatError(
            f"{path}: declares {int(n_voxels):,} voxels, which need about "
            f"{need / 2**30:.1f} GiB; only {avail / 2**30:.1f} GiB of memory is available"
        )


def disk_array(hu: np.ndarray) -> np.ndarray:
    """What a writer stores: int16 when exact (CT HU are int16 on disk), else float32."""
    out = hu_array(hu)
    return out if out.dtype == np.int16 else np.asarray(hu, dtype=np.float32)


def check_writable(scan: Scan, path) -> None:
    """A scan a writer can store: 3-D, finite values, a geometry every format can hold."""
    check_volume(scan.hu, path)
    check_finite(np.asarray(scan.hu), "scan to write")
    check_geometry(scan.spacing, scan.origin, scan.direction, "scan to write")


def check_min_size(shape, minimum, path, operation: str, why: str) -> None:
    """ScanFormatError unless a (z, y, x) `shape` is at least `minimum` voxels along every axis.
    The one minimum-size check: each operation states its own minimum and why (the generator's
    slabs, CT-GAN's cube); reading a scan asks only for a volume."""
    small = [int(s) < int(m) for s, m in zip(shape, minimum)]
    if any(small):
        have = " x ".join(str(int(s)) for s in shape)
        need = " x ".join(str(int(m)) for m in minimum)
        raise ScanFormatError(f"{path}: {have} voxels (z x y x x) is too small for {operation}, "
                              f"which needs at least {need} ({why})")


def check_coord(coord_vox, vol_shape) -> np.ndarray:
    """A voxel coordinate (z, y, x floats) inside a volume of `vol_shape`, as ints truncated
    the way CT-GAN's cutCube does; anything else (outside, not three finite numbers) is a
    CoordinateError. The one check for tamper, GUI and --targets locations."""
    c = np.asarray(coord_vox, dtype=np.float64).reshape(-1)
    if c.shape != (3,) or not np.all(np.isfinite(c)):
        got = np.asarray(coord_vox).tolist()
        raise CoordinateError(f"coordinate must be 3 finite numbers z,y,x, got {got}")
    shape = np.asarray(vol_shape[:3])
    if np.any(c < 0) or np.any(c >= shape):
        shown = ",".join(f"{v:g}" for v in c)
        raise CoordinateError(f"voxel coordinate (z,y,x)=({shown}) is outside the scan of shape "
                              f"(z,y,x)={tuple(int(s) for s in shape)}")
    # Truncate like cutCube, but forgive float noise from world->voxel (29.9999999 is voxel 30).
    return np.minimum(np.floor(c + 1e-6), shape - 1).astype(np.int64)
