"""Scan I/O: MetaImage/NRRD/NIfTI (SimpleITK), NumPy and DICOM (pydicom) <-> (z, y, x) HU arrays.

One entry point, load_scan, and the public names of the modules that do the work:
  utils.scan          the Scan type, geometry, and the checks every read scan passes
  utils.scan_paths    which files an input reads and an output writes; the guard between them
  utils.scan_headers  header pre-checks: declared size against the data and the memory
  utils.metaimage_io  MetaImage, NRRD, NIfTI via SimpleITK; save_mhd, save_sitk (NRRD, NIfTI)
  utils.numpy_io      .npy + .json geometry sidecar
  utils.dicom_read    series selection, geometry and pixels of a DICOM CT series
  utils.dicom_write   save_dicom_series (dciodvfy-valid), validate_dicom
Every failure is a utils.errors type with a one-line message naming the file; writers are
atomic (nothing partial is left) and refuse to write over any file the source scan was read from.
"""
from __future__ import annotations

import os
from pathlib import Path

from utils.dicom_read import is_dicom_file, load_dicom
from utils.dicom_write import save_dicom_series, validate_dicom
from utils.errors import InputFileError, ScanFormatError
from utils.metaimage_io import SITK_SUFFIXES, load_sitk, save_mhd, save_sitk
from utils.numpy_io import load_numpy, save_numpy
from utils.scan import Scan, check_not_a_mask, hu_array, vox2world, world2vox
from utils.scan_paths import SCAN_SUFFIXES, input_files, refuse_overwrite

__all__ = ["Scan", "load_scan", "save_mhd", "save_sitk",
           "save_dicom_series", "save_numpy", "load_numpy", "validate_dicom",
           "hu_array", "world2vox", "vox2world", "input_files", "refuse_overwrite"]


def _check_path(p: Path) -> None:
    try:
        os.stat(p)
    except OSError as e:
        if p.is_symlink():
            raise InputFileError(f"{p}: a dangling symbolic link or a link loop") from None
        if isinstance(e, FileNotFoundError):
            raise InputFileError(f"{p}: no such file or folder") from None
        raise InputFileError(f"{p}: cannot read ({e.strerror})") from None
    if not os.access(p, os.R_OK) or (p.is_dir() and not os.access(p, os.X_OK)):
        raise InputFileError(f"{p}: cannot read (permission denied)")


def load_scan(path: str | os.PathLike, *, series_uid: str | None = None,
              label: bool = False) -> Scan:
    """Read a CT scan: `.mhd`/`.mha`/`.nrrd`/`.nhdr`/`.nii(.gz)`/`.hdr` (SimpleITK), `.npy`, a
    folder of one DICOM series, or one Enhanced (multi-frame) CT file.

    Returns HU (z, y, x), int16 when exact, else float32; geometry in (z, y, x).
    Raises InputFileError (missing/empty) or ScanFormatError (anything that is not a usable CT:
    docs/safety.md#geometry-and-content). `label`: the file is a label map (0/1 allowed), not a CT.
    """
    scan = _read(Path(path), series_uid)
    if not label:
        check_not_a_mask(scan.hu, path)
    return scan


def _read(p: Path, series_uid: str | None) -> Scan:
    """The reader for `p`'s format; each ends in utils.scan.check_scan."""
    _check_path(p)
    if p.is_dir():
        return load_dicom(p, series_uid)
    if p.stat().st_size == 0:
        raise InputFileError(f"{p}: file is empty")
    name = p.name.lower()
    if name.endswith(SITK_SUFFIXES):
        return load_sitk(p)
    if name.endswith(".npy"):  # save_numpy's .npy + .json pair (no SimpleITK needed)
        return load_numpy(p)
    if is_dicom_file(p):
        return load_dicom(p, series_uid)
    if name.endswith((".raw", ".zraw")) and p.with_suffix(".mhd").exists():
        raise ScanFormatError(
            f"{p}: is the data half of a MetaImage; pass {p.with_suffix('.mhd').name}"
        )
    names = ", ".join(SCAN_SUFFIXES)
    raise ScanFormatError(f"{p}: unknown scan format (expected {names} or a DICOM folder)")
