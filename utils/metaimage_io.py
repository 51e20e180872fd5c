"""MetaImage, NRRD and NIfTI through SimpleITK: read (after utils.scan_headers' pre-checks)
and write MetaImage atomically."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from utils.atomic import os_error_message
from utils.errors import OutputError, ScanFormatError
from utils.scan import Scan, check_scan, check_writable, disk_array, hu_array
from utils.scan_headers import precheck_mhd, precheck_nifti, precheck_nrrd
from utils.scan_paths import SCAN_SUFFIXES, refuse_overwrite

# What SimpleITK reads: every scan suffix but NumPy's, and an Analyze .img named directly.
SITK_SUFFIXES = tuple(s for s in SCAN_SUFFIXES if s != ".npy") + (".img",)


def _sitk():
    import SimpleITK as sitk  # lazy: keeps `import utils.scan_io` free of SimpleITK

    return sitk


@contextlib.contextmanager
def c_output_captured():
    """Capture what C/C++ code prints on file descriptors 1 and 2 during the block (ITK's MetaIO
    writes 'M_WriteElementsData: file stream is fail after write' straight to the terminal on a
    full disk): errors stay one line. Yields a list that receives the captured text."""
    captured: list[str] = []
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no usable descriptors (embedded interpreters): do not capture
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.append(sink.read(65536).decode("utf-8", "replace"))


def sitk_message(e: Exception) -> str:
    """SimpleITK errors are several lines with C++ file names: keep the informative part."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith("Exception thrown") and not ln.startswith("/")]
    msg = " ".join(keep) or (lines[-1] if lines else "unreadable")
    for prefix in ("sitk::ERROR:", "ITK ERROR:"):
        msg = msg.replace(prefix, "")
    return " ".join(msg.split())[:300]


def _precheck(path: Path) -> None:
    name = path.name.lower()
    if name.endswith((".mhd", ".mha")):
        precheck_mhd(path)
    elif name.endswith((".nrrd", ".nhdr")):
        precheck_nrrd(path)
    elif name.endswith((".nii", ".nii.gz", ".hdr")):
        precheck_nifti(path)
    elif name.endswith(".img") and path.with_suffix(".hdr").is_file():
        precheck_nifti(path.with_suffix(".hdr"))


def load_sitk(path: Path) -> Scan:
    """Read a MetaImage/NRRD/NIfTI/Analyze file once its header has passed the pre-checks."""
    _precheck(path)
    sitk = _sitk()
    try:
        with c_output_captured():
            img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ScanFormatError(f"{path}: cannot read: {sitk_message(e)}") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ScanFormatError(
            f"{path}: has {img.GetNumberOfComponentsPerPixel()} values per voxel; a CT scan has one"
        )
    dim = img.GetDimension()
    if dim == 2:  # no slice axis, no slice spacing: a 3-D file of one slice is a volume
        raise ScanFormatError(
            f"{path}: is a 2-D image (size {img.GetSize()}), a 3-D CT volume is needed"
        )
    if dim != 3:
        raise ScanFormatError(f"{path}: is a {dim}-D image, a 3-D CT volume is needed")
    arr = sitk.GetArrayFromImage(img)  # (z, y, x)
    if arr.dtype.kind not in "biuf":
        raise ScanFormatError(f"{path}: holds {arr.dtype} values; a CT scan is numbers")
    d_xyz = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    scan = Scan(
        hu=arr,
        spacing=np.asarray(img.GetSpacing(), dtype=np.float64)[::-1],
        origin=np.asarray(img.GetOrigin(), dtype=np.float64)[::-1],
        direction=d_xyz[::-1, ::-1],  # rows = world axes, columns = index axes, both reversed
        source_path=str(path),
    )
    check_scan(scan, path)
    scan.hu = hu_array(arr)
    return scan


def _to_sitk_image(scan: Scan, arr: np.ndarray):
    sitk = _sitk()
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(v) for v in scan.spacing[::-1]])
    img.SetOrigin([float(v) for v in scan.origin[::-1]])
    img.SetDirection([float(v) for v in np.asarray(scan.direction)[::-1, ::-1].ravel()])
    return img


def _write_sitk(scan: Scan, path: Path, extra: tuple[str, ...] = (), **kw) -> Path:
    """Write `scan` with SimpleITK atomically: under its final name(s) in a temporary folder
    beside `path` (so a MetaImage header names the final data file), then renamed into place,
    the `extra` files (a header's data file) first."""
    check_writable(scan, path)
    refuse_overwrite(path, scan.source_path)
    img = _to_sitk_image(scan, disk_array(scan.hu))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise OutputError(os_error_message(path, e)) from None
    try:
        try:
            with c_output_captured():
                _sitk().WriteImage(img, str(tmpdir / path.name), **kw)
        except RuntimeError as e:
            msg = sitk_message(e).replace(str(tmpdir / path.name), str(path))
            raise OutputError(f"cannot write {path}: {msg}") from None
        for name in (*extra, path.name):
            os.replace(tmpdir / name, path.parent / name)
    except OSError as e:
        raise OutputError(os_error_message(path, e)) from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def save_sitk(scan: Scan, path: str | os.PathLike) -> Path:
    """Write `scan` as NRRD (.nrrd) or NIfTI (.nii, .nii.gz) by its suffix, atomically."""
    path = Path(path)
    if not path.name.lower().endswith((".nrrd", ".nii", ".nii.gz")):
        raise OutputError(f"{path}: a NRRD or NIfTI output must end in .nrrd, .nii or .nii.gz")
    return _write_sitk(scan, path)


def save_mhd(scan: Scan, path: str | os.PathLike, *, compress: bool = False) -> Path:
    """Write `scan` as MetaImage (.mhd + .raw, or .zraw when compressed), atomically.

    Both files are written under a temporary folder beside `path` with their final names (so the
    header names the final data file), then renamed into place. Refuses to overwrite any file
    the source scan was read from.
    """
    path = Path(path)
    if path.suffix.lower() != ".mhd":
        raise OutputError(f"{path}: a MetaImage output must end in .mhd")
    data_name = path.with_suffix(".zraw" if compress else ".raw").name
    return _write_sitk(scan, path, (data_name,), useCompression=compress)
