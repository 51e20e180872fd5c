"""DICOM writing: a scan as a CT Image Storage series (one file per slice, explicit VR little
endian) that dciodvfy accepts, carrying the source series' patient, study and equipment."""
from __future__ import annotations

import datetime
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from utils.atomic import atomic_dir
from utils.dicom_read import dicom_quiet
from utils.errors import OutputError
from utils.scan import Scan, check_writable, vox2world
from utils.scan_paths import refuse_overwrite

_INT16 = np.iinfo(np.int16)

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
    "PatientPosition", "BodyPartExamined", "Laterality", "FrameOfReferenceUID", "PositionReferenceIndicator",
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


def _slice_thickness(template, spacing: float) -> str:
    v = getattr(template, "SliceThickness", None) if template is not None else None
    try:
        t = float(v)
    except (TypeError, ValueError):
        t = float("nan")
    return str(v).strip() if np.isfinite(t) and t > 0 else _ds_str(spacing)


# Body parts that are single organs or regions (DICOM CID 4031 entries without a left and a
# right, as dciodvfy knows them); anything else may be paired or is unknown.
_UNPAIRED = {"ABDOMEN", "CHEST", "HEAD", "PANCREAS", "PELVIS", "NECK", "HEART", "LIVER", "SPLEEN", "STOMACH",
             "BRAIN", "SKULL", "CSPINE", "TSPINE", "LSPINE", "SPINE", "WHOLEBODY", "CHESTABDOMEN",
             "ABDOMENPELVIS", "CHESTABDPELVIS", "HEADNECK", "BLADDER", "PROSTATE", "UTERUS", "ESOPHAGUS",
             "COLON", "AORTA", "COCCYX"}


def _laterality(base) -> None:
    """Laterality (type 2C) is kept when the source says R or L. Otherwise it is left out: for
    a single organ or region it must be absent (dciodvfy: an error, empty or not), and for a
    paired or unknown body part an empty value is only a warning's worth of 'unknown'. Image
    Laterality then says B (both sides), which satisfies the condition: an axial CT section
    spans the width of the body (docs/safety.md#valid-private-dicom)."""
    part = str(getattr(base, "BodyPartExamined", "") or "").strip().upper()
    side = str(getattr(base, "Laterality", "") or "").strip().upper()
    if part in _UNPAIRED or side not in ("R", "L"):
        if "Laterality" in base:
            del base.Laterality
    if part not in _UNPAIRED and side not in ("R", "L"):
        base.ImageLaterality = "B"


_SYNTHETIC = {"PatientName": "ANONYMOUS", "PatientID": "ANONYMOUS", "PatientSex": "O",
              "PatientIdentityRemoved": "YES", "DeidentificationMethod": "synthetic header: no source patient data"}


def _identity(template, now):
    """Patient, study, equipment and frame of reference: the source's (a whitelist), else a
    synthetic 'ANONYMOUS' patient; type 2 attributes present, possibly empty."""
    from pydicom.dataset import Dataset  # lazy: keeps `import utils.scan_io` free of pydicom
    from pydicom.uid import generate_uid

    base = Dataset()
    if template is not None:
        for kw in _COPY_TAGS:
            if kw in template:
                setattr(base, kw, template.data_element(kw).value)
    else:  # the type 2 attributes left out here are added empty below
        for kw, v in _SYNTHETIC.items():
            setattr(base, kw, v)
        base.StudyDate = now.strftime("%Y%m%d")
        base.StudyTime = now.strftime("%H%M%S")
    _laterality(base)
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
    if not str(getattr(base, "PatientPosition", "") or ""):
        base.PatientPosition = "HFS"  # type 2C for CT; the usual supine head-first
    return base


@dicom_quiet
def save_dicom_series(scan: Scan, outdir: str | os.PathLike, *, series_description: str = "MITS-GAN derived",
                      series_number: int | None = None) -> Path:
    """Write `scan` as a DICOM CT series (one file per slice, explicit VR little endian).

    Patient/study/equipment come from scan.dicom_headers when present, else a synthetic
    'ANONYMOUS' patient. New series and instance UIDs; ImageType DERIVED\\SECONDARY\\AXIAL.
    Written into a temporary folder renamed to `outdir`; a non-empty `outdir` is refused.
    """
    from pydicom.uid import CTImageStorage, generate_uid  # lazy: keeps `import utils.scan_io` free of pydicom

    outdir = Path(outdir)
    check_writable(scan, outdir)
    refuse_overwrite(outdir, scan.source_path)
    stored, slope, icpt = _dicom_value_range(scan.hu)
    nz, ny, nx = stored.shape
    d_xyz = np.asarray(scan.direction, dtype=np.float64)[::-1, ::-1]
    row, col = d_xyz[:, 0], d_xyz[:, 1]
    if abs(float(row @ col)) > 1e-4 or not np.allclose([np.linalg.norm(row), np.linalg.norm(col)], 1, atol=1e-4):
        raise OutputError(f"cannot write {outdir}: in-plane directions are not orthonormal; DICOM cannot store them")
    now = datetime.datetime.now()
    template = scan.dicom_headers[0] if scan.dicom_headers else None
    series_uid = generate_uid()

    base = _identity(template, now)
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
    # The reconstructed thickness is a fact of the acquisition, not the slice spacing (1.25 mm
    # slices are often 5 mm apart): keep the source's; a non-DICOM source has only the spacing.
    base.SliceThickness = _slice_thickness(template, scan.spacing[0])
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
            ipp = vox2world((k, 0, 0), scan.spacing, scan.origin, scan.direction)[::-1]
            _write_slice(tmp / f"CT{k + 1:05d}.dcm", base, k, ipp, float(ipp @ normal), stored[k])
    return outdir


def _write_slice(path: Path, base, k: int, ipp: np.ndarray, location: float, pixels: np.ndarray) -> None:
    import pydicom  # lazy: keeps `import utils.scan_io` free of pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    ds = Dataset()
    ds.update(base)
    sop_uid = generate_uid()
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds_str(v) for v in ipp]
    ds.SliceLocation = _ds_str(location)
    ds.PixelData = np.ascontiguousarray(pixels).astype("<i2").tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    ds.file_meta = meta
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)


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
