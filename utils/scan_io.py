"""Scan I/O: MetaImage/NRRD (SimpleITK) and DICOM series (pydicom) <-> (z, y, x) HU arrays.

Conventions (SPEC.md section 1): every array and every geometry vector is in (z, y, x) order.
`direction` is the 3x3 direction-cosine matrix in that same order, so
world_zyx = origin + direction @ (spacing * voxel_zyx).
SimpleITK speaks (x, y, z): spacing/origin are reversed and direction_zyx = D_xyz[::-1, ::-1].

Public: load_scan, save_mhd, save_dicom_series, save_numpy, load_numpy, validate_dicom, hu_array.
Every failure is a utils.errors type with a one-line message naming the file; writers are
atomic (nothing partial is left) and refuse to overwrite the scan's own source.
A DICOM series is always read in increasing position along row x column (the usual
right-handed order), so a volume with a left-handed direction written as DICOM reads back
with its slices reversed (same world geometry, different index order).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from utils.atomic import atomic_dir, atomic_path, atomic_write_text, ensure_not_input, os_error_message
from utils.errors import InputFileError, OutputError, ScanFormatError


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


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

_SITK_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr", ".nii", ".nii.gz", ".hdr", ".img")
_INT16 = np.iinfo(np.int16)


def _sitk():
    import SimpleITK as sitk  # local: keeps `import utils.scan_io` cheap

    return sitk


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


def _check_finite(hu: np.ndarray, path) -> None:
    if np.issubdtype(hu.dtype, np.floating) and not np.isfinite(hu).all():
        n = int((~np.isfinite(hu)).sum())
        raise ScanFormatError(f"{path}: {n} voxels are NaN or infinite; not a usable CT scan")


def _check_volume(hu: np.ndarray, path) -> None:
    if hu.ndim != 3:
        raise ScanFormatError(f"{path}: is a {hu.ndim}-D image, a 3-D CT volume is needed")
    if hu.shape[0] < 2:
        raise ScanFormatError(f"{path}: holds a single slice (2-D image), a 3-D CT volume is needed")
    if min(hu.shape) < 1:
        raise ScanFormatError(f"{path}: empty image of shape {hu.shape}")


@contextlib.contextmanager
def _c_output_captured():
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


def _sitk_message(e: Exception) -> str:
    """SimpleITK errors are several lines with C++ file names: keep the informative part."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith("Exception thrown") and not ln.startswith("/")]
    msg = " ".join(keep) or (lines[-1] if lines else "unreadable")
    for prefix in ("sitk::ERROR:", "ITK ERROR:"):
        msg = msg.replace(prefix, "")
    return " ".join(msg.split())[:300]


_MET_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def _read_mhd_header(path: Path) -> tuple[dict[str, str], int]:
    """(key -> value, byte offset just after the ElementDataFile line = LOCAL data start)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(65536)
    except OSError as e:
        raise InputFileError(f"{path}: cannot read ({e.strerror})") from None
    header, pos = {}, 0
    for line in raw.split(b"\n"):
        pos += len(line) + 1
        text = line.decode("latin-1")
        if "=" in text:
            k, v = text.split("=", 1)
            header[k.strip()] = v.strip()
            if k.strip() == "ElementDataFile":
                break
    return header, min(pos, len(raw))


_CHUNK = 1 << 20


def _inflated_size(path: Path, offset: int, stop_after: int, *, gzip_ok: bool = False,
                   owner: Path | None = None) -> int:
    """Bytes a zlib (or gzip) stream starting at `offset` inflates to, counted in bounded memory
    and stopped once above `stop_after`. A stream that is corrupt or ends early (truncated file)
    is a one-line ScanFormatError: the readers would otherwise fill the rest with zeros."""
    import zlib

    wbits = 47 if gzip_ok else 15  # 47: zlib or gzip header, auto-detected
    label = f"{owner}: compressed data {path.name}" if owner is not None and owner != path else \
        f"{path}: compressed data"
    total = 0
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            d = zlib.decompressobj(wbits)
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                while chunk:
                    out = d.decompress(chunk, _CHUNK * 16)
                    total += len(out)
                    if total > stop_after:
                        return total
                    chunk = d.unconsumed_tail
                    if d.eof:
                        rest = d.unused_data + f.read()
                        if not (gzip_ok and rest.lstrip(b"\0")):
                            return total
                        d = zlib.decompressobj(wbits)  # another gzip member
                        chunk = rest
            total += len(d.flush())
            if not d.eof:
                raise ScanFormatError(f"{label} is truncated (ends after {total} bytes)")
    except zlib.error as e:
        raise ScanFormatError(f"{label} is corrupt ({e})") from None
    except OSError as e:
        raise InputFileError(f"{path}: cannot read ({e.strerror})") from None
    return total


def _size_mismatch(path: Path, data: Path, have: int, want: int, what: str) -> None:
    """The data must be exactly what the header describes: fewer bytes is a truncated file (the
    readers zero-fill or fail with a misleading message), more bytes a header that lies about
    the size or the voxel type (the readers silently return garbage)."""
    if have < want:
        raise ScanFormatError(f"{path}: data {data.name} is truncated or the header lies about the size "
                              f"({have} bytes, {what} needs {want})")
    if have > want:
        raise ScanFormatError(f"{path}: the header lies about the size or voxel type: data {data.name} "
                              f"has {have} bytes, {what} describes {want}")


def _precheck_mhd(path: Path) -> None:
    """Check a MetaImage (.mhd/.mha) header against its data before SimpleITK reads it.

    SimpleITK reports a truncated .raw as 'No such file or directory', zero-fills a short
    compressed stream (or prints to the terminal), and reads a header that lies about the voxel
    type as garbage: say what is wrong instead."""
    h, local_offset = _read_mhd_header(path)
    if "DimSize" not in h or "ElementType" not in h or "ElementDataFile" not in h:
        raise ScanFormatError(f"{path}: not a MetaImage header (DimSize/ElementType/ElementDataFile missing)")
    try:
        dims = [int(v) for v in h["DimSize"].split()]
    except ValueError:
        raise ScanFormatError(f"{path}: bad DimSize '{h['DimSize']}'") from None
    if not dims or any(d < 1 for d in dims):
        raise ScanFormatError(f"{path}: bad DimSize '{h['DimSize']}' (sizes must be positive)")
    if len(dims) == 2 or (len(dims) == 3 and dims[2] == 1):
        raise ScanFormatError(f"{path}: is a 2-D image (DimSize {h['DimSize']}), a 3-D CT volume is needed")
    data_file = h["ElementDataFile"]
    if data_file.upper() == "LIST" or "%" in data_file:
        return  # file lists: leave them to SimpleITK
    local = data_file.upper() == "LOCAL"
    raw = path if local else path.parent / data_file
    if not local:
        if not raw.exists():
            raise InputFileError(f"{path}: its data file {raw} does not exist")
        if not raw.is_file():
            raise ScanFormatError(f"{path}: its data file {raw} is not a file")
    compressed = h.get("CompressedData", "False").lower() == "true"
    size = _MET_SIZES.get(h["ElementType"])
    try:
        channels = int(h.get("ElementNumberOfChannels", "1") or 1)
    except ValueError:
        raise ScanFormatError(f"{path}: bad ElementNumberOfChannels") from None
    header_size = h.get("HeaderSize", "0") or "0"
    if not size or header_size not in ("0", ""):
        return  # unknown type (SimpleITK says so) or skipped bytes: no exact size to check
    want = int(np.prod(dims, dtype=np.int64)) * size * channels
    offset = local_offset if local else 0
    what = f"DimSize {h['DimSize']} {h['ElementType']}"
    if compressed:
        have = _inflated_size(raw, offset, want, owner=path)
    else:
        have = raw.stat().st_size - offset
    _size_mismatch(path, raw, have, want, what)


def _precheck_nifti(path: Path) -> None:
    """NIfTI-1/2 (.nii, .nii.gz): the data must be as long as the header says (SimpleITK
    zero-fills a truncated file, compressed or not)."""
    import struct

    gz = path.name.lower().endswith(".gz")
    try:
        if gz:
            import gzip

            with gzip.open(path, "rb") as f:
                head = f.read(544)
        else:
            with open(path, "rb") as f:
                head = f.read(544)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ScanFormatError(f"{path}: not a readable NIfTI file ({e})") from None
    if len(head) < 348:
        raise ScanFormatError(f"{path}: truncated NIfTI header ({len(head)} bytes)")
    for end in "<>":
        n = struct.unpack(end + "i", head[:4])[0]
        if n in (348, 540):
            break
    else:
        return  # not NIfTI (Analyze .hdr/.img, ...): SimpleITK decides
    if n == 348:
        dim = struct.unpack(end + "8h", head[40:56])
        bitpix = struct.unpack(end + "h", head[72:74])[0]
        vox_offset = int(struct.unpack(end + "f", head[108:112])[0])
    else:
        if len(head) < 540:
            raise ScanFormatError(f"{path}: truncated NIfTI-2 header ({len(head)} bytes)")
        bitpix = struct.unpack(end + "h", head[14:16])[0]
        dim = struct.unpack(end + "8q", head[16:80])
        vox_offset = struct.unpack(end + "q", head[168:176])[0]
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dim[1:ndim + 1]) or bitpix < 1:
        raise ScanFormatError(f"{path}: bad NIfTI header (dim {list(dim)}, bitpix {bitpix})")
    want = max(vox_offset, n) + int(np.prod(dim[1:ndim + 1], dtype=np.int64)) * bitpix // 8
    have = _inflated_size(path, 0, want, gzip_ok=True) if gz else path.stat().st_size
    if have < want:
        raise ScanFormatError(f"{path}: is truncated ({have} bytes, its header needs {want})")


def _load_sitk(path: Path) -> Scan:
    sitk = _sitk()
    name = path.name.lower()
    if name.endswith((".mhd", ".mha")):
        _precheck_mhd(path)
    elif name.endswith((".nii", ".nii.gz")):
        _precheck_nifti(path)
    try:
        with _c_output_captured():
            img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ScanFormatError(f"{path}: cannot read: {_sitk_message(e)}") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ScanFormatError(f"{path}: has {img.GetNumberOfComponentsPerPixel()} values per voxel; a CT scan has one")
    dim = img.GetDimension()
    if dim == 2 or (dim == 3 and img.GetSize()[2] == 1):
        raise ScanFormatError(f"{path}: is a 2-D image (size {img.GetSize()}), a 3-D CT volume is needed")
    if dim != 3:
        raise ScanFormatError(f"{path}: is a {dim}-D image, a 3-D CT volume is needed")
    arr = sitk.GetArrayFromImage(img)  # (z, y, x)
    _check_finite(arr, path)
    hu = hu_array(arr)
    d_xyz = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    return Scan(
        hu=hu,
        spacing=np.asarray(img.GetSpacing(), dtype=np.float64)[::-1],
        origin=np.asarray(img.GetOrigin(), dtype=np.float64)[::-1],
        direction=d_xyz[::-1, ::-1],  # rows = world axes, columns = index axes, both reversed
        source_path=str(path),
    )


def _dicom_quiet(fn):
    """Run a DICOM reader/writer with pydicom's value validation silenced.

    pydicom reports an invalid header value by printing it (a UserWarning and a 'pydicom' log
    record, e.g. "Invalid value for VR DA: '1970-01-01'"): for patient attributes that would put
    identity on the terminal and in logs. Values are copied verbatim, never interpreted, so the
    checks are not needed here; our own errors never quote patient attributes (issue 6.4)."""
    import functools
    import logging
    import warnings

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydicom import config

        settings = config.settings
        saved = (settings.reading_validation_mode, settings.writing_validation_mode)
        logger = logging.getLogger("pydicom")
        level = logger.level
        try:
            settings.reading_validation_mode = config.IGNORE
            settings.writing_validation_mode = config.IGNORE
            logger.setLevel(logging.ERROR)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return fn(*args, **kwargs)
        finally:
            settings.reading_validation_mode, settings.writing_validation_mode = saved
            logger.setLevel(level)

    return wrapper


def _is_dicom_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    # Preamble-less files: group 0x0008 or 0x0002 little-endian tag at the start.
    return p.suffix.lower() in (".dcm", ".dicom", ".ima") and head[:2] in (b"\x08\x00", b"\x02\x00")


def _series_label(ds) -> str:
    uid = str(getattr(ds, "SeriesInstanceUID", "?"))
    desc = str(getattr(ds, "SeriesDescription", "") or "").strip()
    return f"{uid} ({desc})" if desc else uid


def _float_list(ds, name, n, path) -> np.ndarray:
    v = getattr(ds, name, None)
    try:
        a = np.asarray([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        a = np.empty(0)
    if a.shape != (n,) or not np.isfinite(a).all():
        raise ScanFormatError(f"{path}: missing or bad {name} ({v!r})")
    return a


def _decoder_available(ts) -> bool:
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(ts).is_available)
    except Exception:  # noqa: BLE001 - unknown transfer syntax: no decoder
        return False


@_dicom_quiet
def _load_dicom_dir(folder: Path, series_uid: str | None) -> Scan:
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        subdirs = [p for p in folder.iterdir() if p.is_dir()]
        if subdirs:
            raise ScanFormatError(f"{folder}: no DICOM files in this folder, only {len(subdirs)} sub-folder(s); "
                                  f"pass the folder that holds the series")
        raise InputFileError(f"{folder}: folder is empty")
    headers = []
    for p in files:
        if not _is_dicom_file(p):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as e:
            raise ScanFormatError(f"{p}: unreadable DICOM file ({e})") from None
        if "SeriesInstanceUID" not in ds and "ImagePositionPatient" not in ds:
            continue  # DICOMDIR and other non-image objects
        headers.append((p, ds))
    if not headers:
        raise ScanFormatError(f"{folder}: no DICOM files in this folder")
    series: dict[str, list] = {}
    for p, ds in headers:
        series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append((p, ds))
    if series_uid is not None:
        if series_uid not in series:
            raise ScanFormatError(
                f"{folder}: no series {series_uid}; it holds {', '.join(_series_label(v[0][1]) for v in series.values())}")
        chosen = series[series_uid]
    elif len(series) > 1:
        names = "; ".join(f"{_series_label(v[0][1])}: {len(v)} files" for v in series.values())
        raise ScanFormatError(f"{folder}: holds {len(series)} DICOM series ({names}); say which with series_uid=")
    else:
        chosen = next(iter(series.values()))

    p0, ds0 = chosen[0]
    modality = str(getattr(ds0, "Modality", "") or "")
    if modality != "CT":
        raise ScanFormatError(f"{p0}: Modality is '{modality or 'missing'}', not CT")
    if len(chosen) < 2:
        raise ScanFormatError(f"{folder}: the series has one slice (2-D image), a 3-D CT volume is needed")
    for p, ds in chosen:
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise ScanFormatError(f"{p}: multi-frame (enhanced) DICOM is not supported; use one file per slice")
        if str(getattr(ds, "Modality", "")) != "CT":
            raise ScanFormatError(f"{p}: Modality is '{getattr(ds, 'Modality', 'missing')}', not CT")

    iop = _float_list(ds0, "ImageOrientationPatient", 6, p0)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise ScanFormatError(f"{p0}: ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors")
    for p, ds in chosen:
        for kw in ("Rows", "Columns"):
            if not isinstance(getattr(ds, kw, None), int):
                raise ScanFormatError(f"{p}: missing {kw}; not an image")
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    psp = _float_list(ds0, "PixelSpacing", 2, p0)
    items = []
    for p, ds in chosen:
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ScanFormatError(f"{p}: slice size {ds.Rows}x{ds.Columns} differs from {p0.name}'s {rows}x{cols}")
        if not np.allclose(_float_list(ds, "ImageOrientationPatient", 6, p), iop, atol=1e-4):
            raise ScanFormatError(f"{p}: ImageOrientationPatient differs from the other slices")
        if not np.allclose(_float_list(ds, "PixelSpacing", 2, p), psp, rtol=1e-4, atol=1e-5):
            raise ScanFormatError(f"{p}: inconsistent spacing: PixelSpacing differs from the other slices")
        ipp = _float_list(ds, "ImagePositionPatient", 3, p)
        items.append((float(ipp @ normal), ipp, p, ds))
    items.sort(key=lambda t: t[0])
    pos = np.array([t[0] for t in items])
    gaps = np.diff(pos)
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        a, b = items[dup[0]][2], items[dup[0] + 1][2]
        raise ScanFormatError(f"{folder}: two slices at the same position {pos[dup[0]]:.3f} mm ({a.name}, {b.name})")
    step = float(np.median(gaps))
    tol = max(0.01 * step, 1e-3)
    bad = np.flatnonzero(np.abs(gaps - step) > tol)
    if bad.size:
        i = int(bad[0])
        ratio = gaps[i] / step
        if abs(ratio - round(ratio)) * step <= tol and round(ratio) >= 2:
            raise ScanFormatError(
                f"{folder}: missing slice: {int(round(ratio)) - 1} slice(s) missing between positions "
                f"{pos[i]:.3f} and {pos[i + 1]:.3f} mm ({items[i][2].name}, {items[i + 1][2].name})")
        raise ScanFormatError(
            f"{folder}: inconsistent spacing between slices ({gaps.min():.3f} to {gaps.max():.3f} mm, "
            f"first odd gap after {items[i][2].name})")
    # Slice axis from the actual positions (keeps gantry tilt / shear exactly).
    ipps = np.stack([t[1] for t in items])
    n = len(items)
    vec = (ipps[-1] - ipps[0]) / (n - 1)
    expected = ipps[0] + np.outer(np.arange(n), vec)
    if np.abs(ipps - expected).max() > tol + 1e-3:
        raise ScanFormatError(f"{folder}: slice positions are not on a straight line (inconsistent spacing)")
    dz = float(np.linalg.norm(vec))

    slices = []
    kept_headers = []
    for _, _, p, _ in items:
        try:
            ds = pydicom.dcmread(p)
        except (InvalidDicomError, OSError, ValueError, EOFError) as e:
            raise ScanFormatError(f"{p}: unreadable DICOM file ({e})") from None
        if "PixelData" not in ds:
            raise ScanFormatError(f"{p}: no pixel data")
        try:
            px = ds.pixel_array
        except Exception as e:  # noqa: BLE001 - pydicom raises many kinds for missing decoders
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            if ts is not None and ts.is_compressed and not _decoder_available(ts):
                raise ScanFormatError(
                    f"{p}: compressed transfer syntax {ts.name} and no decoder installed "
                    f"(pip install pylibjpeg pylibjpeg-libjpeg, or gdcm)") from None
            raise ScanFormatError(f"{p}: cannot decode pixel data: {str(e).splitlines()[0][:200]}") from None
        if px.shape != (rows, cols):
            raise ScanFormatError(f"{p}: pixel data of shape {px.shape}, expected ({rows}, {cols})")
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        icpt = float(getattr(ds, "RescaleIntercept", 0) or 0)
        if slope == int(slope) and icpt == int(icpt):  # the usual case: stay in exact integers
            slices.append(px.astype(np.int32) * int(slope) + int(icpt))
        else:
            slices.append(px.astype(np.float64) * slope + icpt)
        del ds.PixelData  # headers are kept for metadata, not pixels
        kept_headers.append(ds)
    if all(np.issubdtype(s.dtype, np.integer) for s in slices):
        vol = np.stack([s.astype(np.int32, copy=False) for s in slices])
    else:
        vol = np.stack([np.asarray(s, dtype=np.float64) for s in slices])
    _check_finite(vol, folder)
    hu = hu_array(vol)
    d_xyz = np.column_stack([row, col, vec / dz])
    return Scan(
        hu=hu,
        spacing=np.array([dz, psp[0], psp[1]]),  # PixelSpacing = (row spacing = y, column spacing = x)
        origin=ipps[0][::-1].copy(),
        direction=d_xyz[::-1, ::-1],
        source_path=str(folder),
        dicom_headers=kept_headers,
    )


def load_scan(path: str | os.PathLike, *, series_uid: str | None = None) -> Scan:
    """Read a CT scan: `.mhd`/`.mha`/`.nrrd`/`.nii(.gz)` (SimpleITK) or a folder of one DICOM series.

    Returns HU (z, y, x), int16 when exact, else float32; geometry in (z, y, x).
    Raises InputFileError (missing/empty) or ScanFormatError (anything that is not a usable CT).
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p}: no such file or folder")
    if p.is_dir():
        return _load_dicom_dir(p, series_uid)
    try:
        if p.stat().st_size == 0:
            raise InputFileError(f"{p}: file is empty")
    except OSError as e:
        raise InputFileError(f"{p}: cannot read ({e.strerror})") from None
    if not os.access(p, os.R_OK):
        raise InputFileError(f"{p}: cannot read (permission denied)")
    name = p.name.lower()
    if name.endswith(_SITK_SUFFIXES):
        return _load_sitk(p)
    if name.endswith(".npy"):  # save_numpy's .npy + .json pair (no SimpleITK needed)
        return load_numpy(p)
    if _is_dicom_file(p):
        raise ScanFormatError(f"{p}: is a single DICOM file (2-D image); pass the folder holding the whole series")
    if name.endswith(".raw") and p.with_suffix(".mhd").exists():
        raise ScanFormatError(f"{p}: is the data half of a MetaImage; pass {p.with_suffix('.mhd').name}")
    raise ScanFormatError(f"{p}: unknown scan format (expected .mhd, .mha, .nrrd, .nii.gz, .npy or a DICOM folder)")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _disk_dtype(hu: np.ndarray) -> np.ndarray:
    """int16 when exact (SPEC section 1: HU are int16 on disk), else float32."""
    out = hu_array(hu)
    return out if out.dtype == np.int16 else np.asarray(hu, dtype=np.float32)


def _refuse_source(scan: Scan, out: Path) -> None:
    ensure_not_input(out, [scan.source_path])
    if out.suffix.lower() == ".mhd":
        for ext in (".raw", ".zraw"):
            ensure_not_input(out.with_suffix(ext), [scan.source_path])


def _to_sitk_image(scan: Scan, arr: np.ndarray):
    sitk = _sitk()
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(v) for v in scan.spacing[::-1]])
    img.SetOrigin([float(v) for v in scan.origin[::-1]])
    img.SetDirection([float(v) for v in np.asarray(scan.direction)[::-1, ::-1].ravel()])
    return img


def save_mhd(scan: Scan, path: str | os.PathLike, *, compress: bool = False) -> Path:
    """Write `scan` as MetaImage (.mhd + .raw, or .zraw when compressed), atomically.

    Both files are written under a temporary folder beside `path` with their final names (so the
    header names the final data file), then renamed into place. Refuses to overwrite the source.
    """
    path = Path(path)
    if path.suffix.lower() != ".mhd":
        raise OutputError(f"{path}: a MetaImage output must end in .mhd")
    _check_volume(scan.hu, path)
    _check_finite(np.asarray(scan.hu), "scan to write")
    _refuse_source(scan, path)
    arr = _disk_dtype(scan.hu)
    img = _to_sitk_image(scan, arr)
    sitk = _sitk()
    data_name = path.with_suffix(".zraw" if compress else ".raw").name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise OutputError(os_error_message(path, e)) from None
    try:
        # Final names inside a temporary folder: the header then names the final data file.
        try:
            with _c_output_captured():
                sitk.WriteImage(img, str(tmpdir / path.name), useCompression=compress)
        except RuntimeError as e:
            msg = _sitk_message(e).replace(str(tmpdir / path.name), str(path))
            raise OutputError(f"cannot write {path}: {msg}") from None
        os.replace(tmpdir / data_name, path.parent / data_name)
        os.replace(tmpdir / path.name, path)
    except OSError as e:
        raise OutputError(os_error_message(path, e)) from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


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
    _refuse_source(scan, path)
    arr = _disk_dtype(scan.hu)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)
    atomic_write_text(path.with_suffix(".json"), json.dumps(_geometry_json(scan, arr.dtype), indent=2) + "\n")
    return path


def load_numpy(path: str | os.PathLike) -> Scan:
    """Read what save_numpy wrote (.npy + .json sidecar; without the sidecar: 1 mm, origin 0)."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ScanFormatError(f"{path}: not a NumPy array file ({str(e).splitlines()[0]})") from None
    _check_volume(arr, path)
    _check_finite(arr, path)
    side = path.with_suffix(".json")
    geo = {}
    if side.exists():
        try:
            geo = json.loads(side.read_text())
        except (ValueError, OSError) as e:
            raise ScanFormatError(f"{side}: bad geometry sidecar ({e})") from None
    return Scan(hu=hu_array(arr), spacing=geo.get("spacing_zyx", (1.0, 1.0, 1.0)),
                origin=geo.get("origin_zyx", (0.0, 0.0, 0.0)),
                direction=geo.get("direction_zyx", np.eye(3)), source_path=str(path))


# -- DICOM ------------------------------------------------------------------------------------

# Attributes copied from the source series (patient, study, equipment, frame of reference and
# a few acquisition facts). A whitelist, not a copy of everything: private tags and per-image
# attributes of the source would be wrong for a derived series.
_COPY_TAGS = (
    "SpecificCharacterSet",
    # Patient
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientSize", "PatientWeight", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # General Study
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "StudyDescription",
    # General Series / Frame of Reference
    "PatientPosition", "BodyPartExamined", "FrameOfReferenceUID", "PositionReferenceIndicator",
    # General Equipment
    "Manufacturer", "InstitutionName", "StationName", "ManufacturerModelName", "DeviceSerialNumber",
    "SoftwareVersions",
    # CT acquisition
    "KVP", "ConvolutionKernel",
)


def _dicom_value_range(hu: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Stored int16 pixels and (slope, intercept) such that HU = stored * slope + intercept."""
    a = np.asarray(hu)
    if np.issubdtype(a.dtype, np.floating):
        a = np.round(a.astype(np.float64))  # CT pixels are integers (documented)
    a = a.astype(np.int64)
    lo, hi = int(a.min()), int(a.max())
    if lo >= _INT16.min and hi <= _INT16.max:
        return a.astype(np.int16), 1.0, 0.0
    slope = 1
    while (hi - lo) / slope > 65535:
        slope *= 2
    # Pick an intercept centring the range in int16 (DICOM: Rescale Intercept is a DS).
    icpt = int(lo + (hi - lo) // 2)
    stored = np.round((a - icpt) / slope).astype(np.int64)
    return np.clip(stored, _INT16.min, _INT16.max).astype(np.int16), float(slope), float(icpt)


def _ds_str(v: float) -> str:
    """A DICOM DS (at most 16 characters) that round-trips float64 where it can."""
    s = repr(float(v))
    if s.endswith(".0"):
        s = s[:-2]
    if len(s) <= 16:
        return s
    for prec in range(15, 0, -1):
        s = f"{v:.{prec}g}"
        if len(s) <= 16:
            return s
    return f"{v:.6e}"


@_dicom_quiet
def save_dicom_series(scan: Scan, outdir: str | os.PathLike, *, series_description: str = "MITS-GAN derived",
                      series_number: int | None = None) -> Path:
    """Write `scan` as a DICOM CT series (one file per slice, explicit VR little endian).

    Patient/study/equipment come from scan.dicom_headers when present, else a synthetic
    'ANONYMOUS' patient. New series and instance UIDs; ImageType DERIVED\\SECONDARY\\AXIAL.
    Written into a temporary folder renamed to `outdir`; a non-empty `outdir` is refused.
    """
    import datetime

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    outdir = Path(outdir)
    _check_volume(scan.hu, outdir)
    _check_finite(np.asarray(scan.hu), "scan to write")
    ensure_not_input(outdir, [scan.source_path])
    stored, slope, icpt = _dicom_value_range(scan.hu)
    nz, ny, nx = stored.shape
    d_xyz = np.asarray(scan.direction, dtype=np.float64)[::-1, ::-1]
    row, col = d_xyz[:, 0], d_xyz[:, 1]
    if abs(float(row @ col)) > 1e-4 or not np.allclose([np.linalg.norm(row), np.linalg.norm(col)], 1, atol=1e-4):
        raise OutputError(f"cannot write {outdir}: in-plane directions are not orthonormal; DICOM cannot store them")
    now = datetime.datetime.now()
    template = scan.dicom_headers[0] if scan.dicom_headers else None
    series_uid = generate_uid()

    base = Dataset()
    if template is not None:
        for kw in _COPY_TAGS:
            if kw in template:
                setattr(base, kw, template.data_element(kw).value)
    else:
        base.PatientName = "ANONYMOUS"
        base.PatientID = "ANONYMOUS"
        base.PatientBirthDate = ""
        base.PatientSex = "O"
        base.PatientIdentityRemoved = "YES"
        base.DeidentificationMethod = "synthetic header: no source patient data"
        base.StudyDate = now.strftime("%Y%m%d")
        base.StudyTime = now.strftime("%H%M%S")
        base.ReferringPhysicianName = ""
        base.StudyID = ""
        base.AccessionNumber = ""
        base.PositionReferenceIndicator = ""
        base.Manufacturer = ""
        base.KVP = ""
    for kw, default in (("StudyInstanceUID", None), ("FrameOfReferenceUID", None)):
        if not str(getattr(base, kw, "") or ""):
            setattr(base, kw, generate_uid())
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator",
               "Manufacturer", "KVP"):
        if kw not in base:
            setattr(base, kw, "")  # type 2: present, may be empty
    if str(getattr(base, "PatientIdentityRemoved", "")).upper() == "YES" and not (
            "DeidentificationMethod" in base or "DeidentificationMethodCodeSequence" in base):
        base.DeidentificationMethod = "unknown (the source series says identity removed)"  # type 1C
    base.Laterality = ""  # type 2C (paired body parts); unknown for a whole chest
    if not str(getattr(base, "PatientPosition", "") or ""):
        base.PatientPosition = "HFS"  # type 2C for CT; the usual supine head-first
    base.SOPClassUID = CTImageStorage
    base.Modality = "CT"
    base.SeriesInstanceUID = series_uid
    base.SeriesNumber = int(series_number if series_number is not None else 900 + (now.second % 100))
    base.SeriesDescription = str(series_description)[:64]
    base.SeriesDate = now.strftime("%Y%m%d")
    base.SeriesTime = now.strftime("%H%M%S")
    base.ContentDate = now.strftime("%Y%m%d")
    base.ContentTime = now.strftime("%H%M%S")
    base.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    base.DerivationDescription = str(series_description)[:1024]
    base.AcquisitionNumber = 1
    base.ImageOrientationPatient = [_ds_str(v) for v in (*row, *col)]
    base.PixelSpacing = [_ds_str(scan.spacing[1]), _ds_str(scan.spacing[2])]
    base.SliceThickness = _ds_str(scan.spacing[0])
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = ny, nx
    base.BitsAllocated = 16
    base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 1
    base.RescaleIntercept = _ds_str(icpt)
    base.RescaleSlope = _ds_str(slope)
    base.RescaleType = "HU"
    if "SpecificCharacterSet" not in base:
        base.SpecificCharacterSet = "ISO_IR 100"
    normal = np.cross(row, col)

    with atomic_dir(outdir) as tmp:
        for k in range(nz):
            ds = Dataset()
            ds.update(base)
            sop_uid = generate_uid()
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = k + 1
            ipp = vox2world((k, 0, 0), scan.spacing, scan.origin, scan.direction)[::-1]
            ds.ImagePositionPatient = [_ds_str(v) for v in ipp]
            ds.SliceLocation = _ds_str(float(ipp @ normal))
            ds.PixelData = np.ascontiguousarray(stored[k]).astype("<i2").tobytes()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
            ds.file_meta = meta
            ds["PixelData"].VR = "OW"
            ds.save_as(tmp / f"CT{k + 1:05d}.dcm", enforce_file_format=True)
    return outdir


def validate_dicom(path: str | os.PathLike) -> list[str] | None:
    """Errors that dciodvfy (Debian package dicom3tools) reports, or None if it is not installed.

    `path` is one file or a folder (every file in it is checked; errors are prefixed by the name).
    Warnings are not returned."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        return None
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
    errors: list[str] = []
    for f in files:
        res = subprocess.run([exe, "-new", os.fspath(f)], capture_output=True, text=True, timeout=120)
        out = (res.stdout or "") + (res.stderr or "")
        errs = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("Error")]
        errors += [f"{f.name}: {e}" for e in errs] if p.is_dir() else errs
    return errors
