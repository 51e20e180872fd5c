"""DICOM reading: series selection, geometry and pixels of one CT series (pydicom).

A folder holds one series, one file per slice, or one Enhanced CT file with many frames (its
geometry then comes from the per-frame functional groups). Every file of the folder must be
part of it: a file that is not a readable slice is an error, never a silently dropped slice.
Slices are read in increasing position along row x column (the usual right-handed order), so
a volume with a left-handed direction written as DICOM reads back with its slices reversed
(same world geometry, different index order).
"""
from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.errors import InputFileError, ScanFormatError
from utils.scan import Scan, check_memory, check_scan, hu_array

_DICOMDIR_UID = "1.2.840.10008.1.3.10"
# Rescale values beyond these are corrupt headers, not CT: HU span about -1024..+30000.
_MAX_SLOPE, _MAX_INTERCEPT = 1e4, 1e5


def dicom_quiet(fn):
    """Run a DICOM reader/writer with pydicom's value validation silenced.

    pydicom reports an invalid header value by printing it (a UserWarning and a 'pydicom' log
    record, e.g. "Invalid value for VR DA: '1970-01-01'"): for patient attributes that would put
    identity on the terminal and in logs. Values are copied verbatim, never interpreted, so the
    checks are not needed here; our own errors never quote patient attributes (docs/safety.md)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydicom import config  # lazy: keeps `import utils.scan_io` free of pydicom

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


def is_dicom_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    # Preamble-less files: group 0x0008 or 0x0002 little-endian tag at the start.
    return p.suffix.lower() in (".dcm", ".dicom", ".ima") and head[:2] in (b"\x08\x00", b"\x02\x00")


@dataclass
class _Frame:
    """One slice: a single-frame file, or frame `index` of a multi-frame file."""
    path: Path
    index: int | None
    ipp: np.ndarray
    iop: np.ndarray
    psp: np.ndarray
    slope: float
    icpt: float


def _series_label(ds) -> str:
    """A series by its UID only: SeriesDescription is free text and may hold patient data."""
    return str(getattr(ds, "SeriesInstanceUID", "?"))


def _floats(item, name, n, path, *, positive=False) -> np.ndarray:
    v = getattr(item, name, None)
    try:
        a = np.asarray([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        a = np.empty(0)
    if a.shape != (n,) or not np.isfinite(a).all() or (positive and (a <= 0).any()):
        need = "positive numbers" if positive else "finite numbers"
        raise ScanFormatError(f"{path}: missing or bad {name} ({n} {need} are needed)")
    return a


def _number(item, name, path, default, kind=float):
    """One numeric attribute as `kind` (float: finite; int: a whole number), `default` when
    absent or empty; anything else (NaN, inf, 'abc') is one line naming the file."""
    v = getattr(item, name, None)
    if v is None or str(v).strip() == "":
        return default
    try:
        x = kind(str(v).strip())
    except (TypeError, ValueError):
        x = None
    if x is None or not np.isfinite(x):
        need = "a finite number" if kind is float else "a whole number"
        raise ScanFormatError(f"{path}: bad {name} ({need} is needed)")
    return x


def _int(ds, name, path, default: int) -> int:
    return _number(ds, name, path, default, int)


def _rescale(item, path) -> tuple[float, float]:
    slope = _number(item, "RescaleSlope", path, 1.0)
    icpt = _number(item, "RescaleIntercept", path, 0.0)
    if slope == 0 or abs(slope) > _MAX_SLOPE or abs(icpt) > _MAX_INTERCEPT:
        raise ScanFormatError(f"{path}: RescaleSlope / RescaleIntercept cannot map stored values "
                              f"to CT Hounsfield units (slope not 0, |slope| <= {_MAX_SLOPE:g}, "
                              f"|intercept| <= {_MAX_INTERCEPT:g})")
    return slope, icpt


def _orientation(item, path) -> np.ndarray:
    iop = _floats(item, "ImageOrientationPatient", 6, path)
    row, col = iop[:3], iop[3:]
    if not (
        np.allclose([np.linalg.norm(row), np.linalg.norm(col)], 1.0, atol=1e-3)
        and abs(row @ col) < 1e-3
    ):
        raise ScanFormatError(f"{path}: ImageOrientationPatient is not two orthogonal unit vectors")
    return iop


def _list_headers(folder: Path) -> list:
    """(path, header) of every file of the folder; anything but a DICOM image is an error."""
    import pydicom  # lazy: keeps `import utils.scan_io` free of pydicom
    from pydicom.errors import InvalidDicomError

    try:
        files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        files = [p for p in files if p.is_file() or not p.is_dir()]
    except OSError as e:
        raise InputFileError(f"{folder}: cannot read the folder ({e.strerror})") from None
    if not files:
        subdirs = [p for p in folder.iterdir() if p.is_dir()]
        if subdirs:
            raise ScanFormatError(
                f"{folder}: no DICOM files in this folder, only {len(subdirs)} sub-folder(s); "
                f"pass the folder that holds the series"
            )
        raise InputFileError(f"{folder}: folder is empty")
    headers = []
    for p in files:
        if not p.is_file():
            raise InputFileError(f"{p}: cannot read (a dangling link or not a regular file)")
        if not is_dicom_file(p):
            raise ScanFormatError(
                f"{p}: not a DICOM file; a series folder must hold only the series "
                f"(move other files out, or hide them with a leading dot)"
            )
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as e:
            raise ScanFormatError(
                f"{p}: unreadable DICOM file ({str(e).splitlines()[0][:200]})"
            ) from None
        sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
        if sop == _DICOMDIR_UID or p.name.upper() == "DICOMDIR":
            continue  # the index of a DICOM medium, not an image
        if "SeriesInstanceUID" not in ds:
            raise ScanFormatError(
                f"{p}: a DICOM file without SeriesInstanceUID (not an image of a series, "
                f"or a truncated file)"
            )
        headers.append((p, ds))
    if not headers:
        raise ScanFormatError(f"{folder}: no DICOM files in this folder")
    return headers


def _choose_series(headers: list, folder: Path, series_uid: str | None) -> list:
    series: dict[str, list] = {}
    for p, ds in headers:
        series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append((p, ds))
    if series_uid is not None:
        if series_uid not in series:
            raise ScanFormatError(
                f"{folder}: no series {series_uid}; it holds {', '.join(_series_label(v[0][1]) for v in series.values())}"
            )
        return series[series_uid]
    if len(series) > 1:
        names = "; ".join(f"{_series_label(v[0][1])}: {len(v)} files" for v in series.values())
        raise ScanFormatError(
            f"{folder}: holds {len(series)} DICOM series ({names}); say which with series_uid="
        )
    return next(iter(series.values()))


def _classic_frames(chosen: list) -> list[_Frame]:
    return [
        _Frame(
            p,
            None,
            _floats(ds, "ImagePositionPatient", 3, p),
            _orientation(ds, p),
            _floats(ds, "PixelSpacing", 2, p, positive=True),
            *_rescale(ds, p),
        )
        for p, ds in chosen
    ]


def _group(ds, i: int, name: str):
    """Functional group `name` of frame i: per-frame first, else shared (DICOM PS3.3 C.7.6.16)."""
    for seq in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        items = getattr(ds, seq, None)
        if not items:
            continue
        item = items[i] if seq.startswith("PerFrame") else items[0]
        inner = getattr(item, name, None)
        if inner:
            return inner[0]
    return None


def _enhanced_frames(p: Path, ds, n: int) -> list[_Frame]:
    per = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per is None or len(per) != n:
        raise ScanFormatError(
            f"{p}: multi-frame file without one PerFrameFunctionalGroupsSequence item per frame"
        )
    frames = []
    for i in range(n):
        pos, ori = _group(ds, i, "PlanePositionSequence"), _group(ds, i, "PlaneOrientationSequence")
        meas = _group(ds, i, "PixelMeasuresSequence")
        if pos is None or ori is None or meas is None:
            raise ScanFormatError(
                f"{p}: frame {i + 1} has no plane position, orientation or pixel measures"
            )
        value = _group(ds, i, "PixelValueTransformationSequence") or ds
        label = f"{p} (frame {i + 1})"
        frames.append(
            _Frame(
                p,
                i,
                _floats(pos, "ImagePositionPatient", 3, label),
                _orientation(ori, label),
                _floats(meas, "PixelSpacing", 2, label, positive=True),
                *_rescale(value, label),
            )
        )
    return frames


def _frames(chosen: list, folder: Path) -> list[_Frame]:
    """Every slice of the chosen series with its geometry and rescale."""
    p0, ds0 = chosen[0]
    for p, ds in chosen:
        modality = str(getattr(ds, "Modality", "") or "")
        if modality != "CT":
            what = "not CT" if modality else "missing"
            raise ScanFormatError(f"{p}: Modality is {what}; a CT series is needed")
        for kw in ("Rows", "Columns"):
            if not isinstance(getattr(ds, kw, None), int) or getattr(ds, kw) < 1:
                raise ScanFormatError(f"{p}: missing {kw}; not an image")
        if (ds.Rows, ds.Columns) != (ds0.Rows, ds0.Columns):
            raise ScanFormatError(f"{p}: slice size (Rows, Columns) differs from {p0.name}'s")
    counts = [_int(ds, "NumberOfFrames", p, 1) for p, ds in chosen]
    if any(c < 1 for c in counts):
        raise ScanFormatError(
            f"{chosen[counts.index(min(counts))][0]}: NumberOfFrames must be >= 1"
        )
    if max(counts) > 1:
        if len(chosen) > 1:
            raise ScanFormatError(
                f"{folder}: a series of {len(chosen)} files, some with several frames; "
                f"one Enhanced CT file or one file per slice is supported"
            )
        return _enhanced_frames(p0, ds0, counts[0])
    return _classic_frames(chosen)


def _lone_spacing(ds, path) -> float:
    """The slice spacing of a series of one slice, which no second position gives:
    SpacingBetweenSlices, else SliceThickness."""
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        dz = _number(ds, name, path, None)
        if dz is not None and dz > 0:
            return float(dz)
    raise ScanFormatError(f"{path}: a series of one slice without SliceThickness or "
                          f"SpacingBetweenSlices (its slice spacing is unknown)")


def _stack(frames: list[_Frame], folder: Path, ds0=None):
    """Frames sorted along the slice normal; (frames, slice vector, first position).
    Missing, duplicate or unevenly spaced slices are errors. One slice is a volume of one slice
    along the normal of its plane (`ds0`: its header, for the spacing)."""
    f0 = frames[0]
    normal = np.cross(f0.iop[:3], f0.iop[3:])
    if len(frames) == 1:
        return frames, normal * _lone_spacing(ds0, folder), f0.ipp
    for f in frames:
        where = f.path if f.index is None else f"{f.path} (frame {f.index + 1})"
        if not np.allclose(f.iop, f0.iop, atol=1e-4):
            raise ScanFormatError(f"{where}: ImageOrientationPatient differs from the other slices")
        if not np.allclose(f.psp, f0.psp, rtol=1e-4, atol=1e-5):
            raise ScanFormatError(
                f"{where}: inconsistent spacing: PixelSpacing differs from the other slices"
            )
    frames = sorted(frames, key=lambda f: float(f.ipp @ normal))
    pos = np.array([float(f.ipp @ normal) for f in frames])
    name = [f.path.name if f.index is None else f"frame {f.index + 1}" for f in frames]
    gaps = np.diff(pos)
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise ScanFormatError(
            f"{folder}: two slices at the same position {pos[i]:.3f} mm ({name[i]}, {name[i + 1]})"
        )
    step = float(np.median(gaps))
    tol = max(0.01 * step, 1e-3)
    bad = np.flatnonzero(np.abs(gaps - step) > tol)
    if bad.size:
        i = int(bad[0])
        ratio = gaps[i] / step
        if abs(ratio - round(ratio)) * step <= tol and round(ratio) >= 2:
            raise ScanFormatError(
                f"{folder}: missing slice: {int(round(ratio)) - 1} slice(s) missing between positions "
                f"{pos[i]:.3f} and {pos[i + 1]:.3f} mm ({name[i]}, {name[i + 1]})"
            )
        raise ScanFormatError(f"{folder}: inconsistent spacing between slices ({gaps.min():.3f} to "
                              f"{gaps.max():.3f} mm, first odd gap after {name[i]})")
    # Slice axis from the actual positions (keeps gantry tilt / shear exactly).
    ipps = np.stack([f.ipp for f in frames])
    n = len(frames)
    vec = (ipps[-1] - ipps[0]) / (n - 1)
    if np.abs(ipps - (ipps[0] + np.outer(np.arange(n), vec))).max() > tol + 1e-3:
        raise ScanFormatError(
            f"{folder}: slice positions are not on a straight line (inconsistent spacing)"
        )
    return frames, vec, ipps[0]


def _decoder_available(ts) -> bool:
    try:
        from pydicom.pixels import get_decoder  # lazy: keeps `import utils.scan_io` free of pydicom

        return bool(get_decoder(ts).is_available)
    except Exception:  # noqa: BLE001 - unknown transfer syntax: no decoder
        return False


def _pixels(p: Path):
    """(header without pixel data, decoded pixel array) of one file."""
    import pydicom  # lazy: keeps `import utils.scan_io` free of pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(p)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as e:
        raise ScanFormatError(
            f"{p}: unreadable DICOM file ({str(e).splitlines()[0][:200]})"
        ) from None
    if "PixelData" not in ds:
        raise ScanFormatError(f"{p}: no pixel data")
    try:
        px = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom raises many kinds for missing decoders
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts is not None and ts.is_compressed and not _decoder_available(ts):
            raise ScanFormatError(
                f"{p}: compressed transfer syntax {ts.name} and no decoder installed "
                f"(JPEG, JPEG-LS and JPEG 2000: pip install python-gdcm)") from None
        raise ScanFormatError(
            f"{p}: cannot decode pixel data: {str(e).splitlines()[0][:200]}"
        ) from None
    if px.dtype.kind not in "biu":
        raise ScanFormatError(f"{p}: pixel data of type {px.dtype}; CT pixels are integers")
    del ds.PixelData  # headers are kept for metadata, not pixels
    return ds, px


def _slice_hu(px: np.ndarray, slope: float, icpt: float) -> np.ndarray:
    if slope == int(slope) and icpt == int(icpt):  # the usual case: stay in exact integers
        return px.astype(np.int64) * int(slope) + int(icpt)
    return px.astype(np.float64) * slope + icpt


def _volume(frames: list[_Frame], rows: int, cols: int) -> tuple[np.ndarray, list]:
    """HU (z, y, x) in the order of `frames`, and the headers kept for writing."""
    slices, kept = [], []
    if frames[0].index is not None:  # one multi-frame file
        ds, px = _pixels(frames[0].path)
        n = len(frames)
        if px.shape != (n, rows, cols):
            raise ScanFormatError(
                f"{frames[0].path}: pixel data of shape {px.shape}, expected ({n}, {rows}, {cols})"
            )
        meas = _group(ds, frames[0].index, "PixelMeasuresSequence")
        if meas is not None and "SliceThickness" in meas:
            ds.SliceThickness = meas.SliceThickness  # what a written classic series copies
        slices = [_slice_hu(px[f.index], f.slope, f.icpt) for f in frames]
        kept = [ds]
    else:
        for f in frames:
            ds, px = _pixels(f.path)
            if px.shape != (rows, cols):
                raise ScanFormatError(
                    f"{f.path}: pixel data of shape {px.shape}, expected ({rows}, {cols})"
                )
            slices.append(_slice_hu(px, f.slope, f.icpt))
            kept.append(ds)
    if all(np.issubdtype(s.dtype, np.integer) for s in slices):
        return np.stack(slices), kept
    return np.stack([s.astype(np.float64) for s in slices]), kept


@dicom_quiet
def load_dicom(path: Path, series_uid: str | None = None) -> Scan:
    """A CT volume from a series folder, or from one Enhanced (multi-frame) CT file."""
    import pydicom  # lazy: keeps `import utils.scan_io` free of pydicom

    if path.is_dir():
        chosen = _choose_series(_list_headers(path), path, series_uid)
    else:
        try:
            chosen = [(path, pydicom.dcmread(path, stop_before_pixels=True))]
        except Exception as e:  # noqa: BLE001 - any parse failure of a file we only sniffed
            raise ScanFormatError(
                f"{path}: unreadable DICOM file ({str(e).splitlines()[0][:200]})"
            ) from None
        if _int(chosen[0][1], "NumberOfFrames", path, 1) < 2:
            raise ScanFormatError(f"{path}: is a single DICOM file of one slice; pass the folder "
                                  f"holding the whole series")
    frames, vec, ipp0 = _stack(_frames(chosen, path), path, chosen[0][1])
    ds0 = chosen[0][1]
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    check_memory(
        len(frames) * rows * cols, max(_int(ds0, "BitsAllocated", path, 16) // 8, 1) + 8, path
    )
    vol, kept = _volume(frames, rows, cols)
    dz = float(np.linalg.norm(vec))
    row, col = frames[0].iop[:3], frames[0].iop[3:]
    d_xyz = np.column_stack([row, col, vec / dz])
    scan = Scan(
        hu=vol,
        spacing=np.array([dz, *frames[0].psp]),  # PixelSpacing = (row spacing = y, column = x)
        origin=ipp0[::-1].copy(),
        direction=d_xyz[::-1, ::-1],
        source_path=str(path),
        dicom_headers=kept,
    )
    check_scan(scan, path)
    scan.hu = hu_array(vol)
    return scan
