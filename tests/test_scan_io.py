"""Scan I/O: MetaImage and DICOM round trips, DICOM sorting/metadata, one-line errors, atomic writes."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from tests.conftest import make_phantom
from utils import atomic
from utils.atomic import atomic_dir, atomic_path, atomic_write_bytes, ensure_not_input
from utils.scan_io import refuse_overwrite
from utils.errors import InputFileError, OutputError, ScanFormatError
from utils.scan_io import (Scan, load_numpy, load_scan, save_dicom_series, save_mhd, save_numpy, validate_dicom,
                           vox2world, world2vox)


def rotation_zyx(deg_a=20.0, deg_b=-15.0) -> np.ndarray:
    """A proper (det +1) oblique direction matrix, expressed in (z, y, x)."""
    a, b = np.radians(deg_a), np.radians(deg_b)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])  # about world z (xyz)
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])  # about world x
    d_xyz = rz @ rx
    return d_xyz[::-1, ::-1]


def small_scan(shape=(6, 12, 10), direction=None, seed=1) -> Scan:
    hu = make_phantom(shape, seed=seed)
    return Scan(hu=hu, spacing=(2.5, 0.7, 0.8), origin=(-300.25, -120.5, 35.125),
                direction=np.eye(3) if direction is None else direction)


def assert_same_geometry(a: Scan, b: Scan, atol=1e-6):
    np.testing.assert_allclose(a.spacing, b.spacing, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, atol=atol)


# -- geometry ----------------------------------------------------------------------------------

def test_world_vox_round_trip_oblique():
    d = rotation_zyx()
    rng = np.random.default_rng(0)
    vox = rng.uniform(0, 50, size=(20, 3))
    w = vox2world(vox, (2.5, 0.7, 0.8), (10, -20, 30), d)
    np.testing.assert_allclose(world2vox(w, (2.5, 0.7, 0.8), (10, -20, 30), d), vox, atol=1e-9)
    np.testing.assert_allclose(world2vox(w[3], (2.5, 0.7, 0.8), (10, -20, 30), d), vox[3], atol=1e-9)


def test_direction_convention_matches_simpleitk(tmp_path):
    """Our (z,y,x) world of a voxel must equal SimpleITK's (x,y,z) physical point, reversed."""
    scan = small_scan(direction=rotation_zyx())
    save_mhd(scan, tmp_path / "a.mhd")
    img = sitk.ReadImage(str(tmp_path / "a.mhd"))
    for vox in [(0, 0, 0), (5, 11, 9), (2, 3, 7)]:
        p_xyz = img.TransformContinuousIndexToPhysicalPoint([float(v) for v in vox[::-1]])
        np.testing.assert_allclose(scan.vox2world(vox), p_xyz[::-1], atol=1e-6)
    loaded = load_scan(tmp_path / "a.mhd")
    np.testing.assert_allclose(loaded.vox2world((5, 11, 9)), scan.vox2world((5, 11, 9)), atol=1e-6)


# -- MetaImage ---------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
def test_mhd_round_trip_bit_exact_oblique(tmp_path, compress):
    scan = small_scan(direction=rotation_zyx())
    out = save_mhd(scan, tmp_path / "scan.mhd", compress=compress)
    back = load_scan(out)
    assert back.hu.dtype == np.int16
    assert np.array_equal(back.hu, scan.hu)
    assert_same_geometry(back, scan)
    data_name = "scan.zraw" if compress else "scan.raw"
    header = (tmp_path / "scan.mhd").read_text()
    assert f"ElementDataFile = {data_name}" in header
    assert "MET_SHORT" in header
    # Only the two final files: no temporary names left behind.
    assert sorted(os.listdir(tmp_path)) == sorted(["scan.mhd", data_name])


def test_mhd_float_values_kept_as_float32(tmp_path):
    scan = small_scan()
    scan.hu = scan.hu.astype(np.float32) + 0.25
    back = load_scan(save_mhd(scan, tmp_path / "f.mhd"))
    assert back.hu.dtype == np.float32
    assert np.array_equal(back.hu, scan.hu)


def test_integral_float_becomes_int16(tmp_path):
    scan = small_scan()
    scan.hu = scan.hu.astype(np.float64)
    save_mhd(scan, tmp_path / "i.mhd")
    assert "MET_SHORT" in (tmp_path / "i.mhd").read_text()
    assert load_scan(tmp_path / "i.mhd").hu.dtype == np.int16


def test_mhd_overwrite_atomic_and_refuses_source(tmp_path):
    scan = small_scan()
    save_mhd(scan, tmp_path / "s.mhd")
    src = load_scan(tmp_path / "s.mhd")
    before = (tmp_path / "s.raw").read_bytes()
    src.hu = src.hu + 1
    with pytest.raises(OutputError, match="s.mhd"):
        save_mhd(src, tmp_path / "s.mhd")
    assert (tmp_path / "s.raw").read_bytes() == before
    # Another name is fine, and overwriting a non-source file replaces it.
    save_mhd(src, tmp_path / "t.mhd")
    src.hu = src.hu + 1
    save_mhd(src, tmp_path / "t.mhd")
    assert np.array_equal(load_scan(tmp_path / "t.mhd").hu, scan.hu + 2)


def test_mhd_write_failure_leaves_nothing(tmp_path, monkeypatch):
    scan = small_scan()
    real_replace = os.replace

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OutputError, match="no space left"):
        save_mhd(scan, tmp_path / "x.mhd")
    monkeypatch.setattr(os, "replace", real_replace)
    assert os.listdir(tmp_path) == []


def test_nrrd_and_nifti_read(tmp_path):
    scan = small_scan()
    img = sitk.GetImageFromArray(scan.hu)
    img.SetSpacing(scan.spacing[::-1].tolist())
    img.SetOrigin(scan.origin[::-1].tolist())
    for name in ("a.nrrd", "a.nii.gz", "a.mha"):
        sitk.WriteImage(img, str(tmp_path / name))
        back = load_scan(tmp_path / name)
        assert np.array_equal(back.hu, scan.hu), name
        np.testing.assert_allclose(back.spacing, scan.spacing, atol=1e-5)


def test_numpy_round_trip(tmp_path):
    scan = small_scan(direction=rotation_zyx())
    out = save_numpy(scan, tmp_path / "v.npy")
    geo = json.loads((tmp_path / "v.json").read_text())
    assert geo["shape_zyx"] == list(scan.shape) and geo["axis_order"] == "z,y,x"
    assert np.load(out).dtype == np.int16
    back = load_numpy(out)
    assert np.array_equal(back.hu, scan.hu)
    assert_same_geometry(back, scan)


# -- MetaImage / file errors ---------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(InputFileError, match="nope.mhd"):
        load_scan(tmp_path / "nope.mhd")


def test_empty_file_and_folder(tmp_path):
    (tmp_path / "e.mhd").write_bytes(b"")
    with pytest.raises(InputFileError, match="empty"):
        load_scan(tmp_path / "e.mhd")
    (tmp_path / "d").mkdir()
    with pytest.raises(InputFileError, match="empty"):
        load_scan(tmp_path / "d")


def test_truncated_raw(tmp_path):
    save_mhd(small_scan(), tmp_path / "t.mhd")
    os.truncate(tmp_path / "t.raw", 100)
    with pytest.raises(ScanFormatError, match=r"t\.mhd.*truncated"):
        load_scan(tmp_path / "t.mhd")


def test_header_lies_about_size(tmp_path):
    save_mhd(small_scan(), tmp_path / "h.mhd")
    text = (tmp_path / "h.mhd").read_text().replace("DimSize = 10 12 6", "DimSize = 10 12 60")
    (tmp_path / "h.mhd").write_text(text)
    with pytest.raises(ScanFormatError, match="header lies"):
        load_scan(tmp_path / "h.mhd")


def test_missing_raw_and_garbage_header(tmp_path):
    save_mhd(small_scan(), tmp_path / "m.mhd")
    (tmp_path / "m.raw").unlink()
    with pytest.raises(InputFileError, match="m.raw"):
        load_scan(tmp_path / "m.mhd")
    (tmp_path / "g.mhd").write_text("this is not a header\n")
    with pytest.raises(ScanFormatError, match="g.mhd"):
        load_scan(tmp_path / "g.mhd")
    (tmp_path / "g.nrrd").write_bytes(b"garbage" * 10)
    with pytest.raises(ScanFormatError, match="g.nrrd"):
        load_scan(tmp_path / "g.nrrd")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ScanFormatError, match="unknown scan format"):
        load_scan(tmp_path / "x.txt")


def test_2d_image_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(tmp_path / "flat.mhd"))
    with pytest.raises(ScanFormatError, match="2-D"):
        load_scan(tmp_path / "flat.mhd")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(tmp_path / "flat.nrrd"))
    with pytest.raises(ScanFormatError, match="2-D"):
        load_scan(tmp_path / "flat.nrrd")


def test_nan_refused(tmp_path):
    a = make_phantom((4, 8, 8)).astype(np.float32)
    a[1, 2, 3] = np.nan
    a[2, 2, 3] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / "nan.mhd"))
    with pytest.raises(ScanFormatError, match="2 voxels are NaN or infinite"):
        load_scan(tmp_path / "nan.mhd")


# -- DICOM ----------------------------------------------------------------------------------------

def write_series(scan, outdir, **kw):
    save_dicom_series(scan, outdir, **kw)
    return sorted(outdir.iterdir())


def test_dicom_round_trip_bit_exact_oblique(tmp_path):
    scan = small_scan(direction=rotation_zyx())
    files = write_series(scan, tmp_path / "s")
    assert len(files) == scan.shape[0]
    back = load_scan(tmp_path / "s")
    assert back.hu.dtype == np.int16
    assert np.array_equal(back.hu, scan.hu)
    assert_same_geometry(back, scan, atol=1e-5)
    ds = pydicom.dcmread(files[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert float(ds.RescaleIntercept) == 0 and float(ds.RescaleSlope) == 1
    assert float(ds.SliceThickness) == 2.5
    assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.8]
    assert str(ds.PatientName) == "ANONYMOUS"


def test_dicom_sorting_shuffled_names(tmp_path):
    scan = small_scan(shape=(9, 8, 8), seed=3)
    files = write_series(scan, tmp_path / "s")
    names = [f"{generate_uid()[-12:]}.dcm" for _ in files]
    random.Random(0).shuffle(names)
    for f, n in zip(files, names):
        f.rename(f.parent / n)
    back = load_scan(tmp_path / "s")
    assert np.array_equal(back.hu, scan.hu)
    np.testing.assert_allclose(back.origin, scan.origin, atol=1e-6)


def test_dicom_values_beyond_int16(tmp_path):
    scan = small_scan(shape=(3, 6, 6))
    hu = scan.hu.astype(np.int32)
    hu[0, 0, 0], hu[1, 1, 1] = 40000, -2000
    scan.hu = hu
    files = write_series(scan, tmp_path / "s")
    assert float(pydicom.dcmread(files[0]).RescaleIntercept) != 0
    # The writer keeps values beyond int16 exactly (stored * slope + intercept) ...
    back = [pydicom.dcmread(f) for f in files]
    got = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in back])
    order = np.argsort([float(d.ImagePositionPatient[2]) for d in back])
    assert np.array_equal(got[order], hu) or np.array_equal(got[order][::-1], hu)
    # ... but no CT scanner makes 40000 HU: the reader refuses it as not Hounsfield units.
    with pytest.raises(ScanFormatError, match="not CT Hounsfield units"):
        load_scan(tmp_path / "s")


def test_dicom_metadata_kept_and_new_uids(tmp_path):
    from pydicom.data import get_testdata_file

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del src.PixelData
    scan = small_scan(shape=(4, 8, 8))
    scan.dicom_headers = [src]
    write_series(scan, tmp_path / "a")
    first = load_scan(tmp_path / "a")
    h = first.dicom_headers
    assert len(h) == 4 and "PixelData" not in h[0]
    assert str(h[0].PatientName) == str(src.PatientName)
    assert h[0].PatientID == src.PatientID
    assert h[0].StudyInstanceUID == src.StudyInstanceUID
    assert h[0].Manufacturer == src.Manufacturer
    assert h[0].SeriesInstanceUID != src.SeriesInstanceUID
    sops = {d.SOPInstanceUID for d in h}
    assert len(sops) == 4 and src.SOPInstanceUID not in sops
    assert len({d.SeriesInstanceUID for d in h}) == 1
    # Writing again from what was read: same study, new series.
    write_series(first, tmp_path / "b", series_description="protected")
    second = load_scan(tmp_path / "b")
    assert second.dicom_headers[0].StudyInstanceUID == src.StudyInstanceUID
    assert second.dicom_headers[0].SeriesInstanceUID != h[0].SeriesInstanceUID
    assert second.dicom_headers[0].SeriesDescription == "protected"
    assert np.array_equal(second.hu, scan.hu)


def test_dicom_refuses_non_empty_outdir_and_source(tmp_path):
    scan = small_scan(shape=(3, 6, 6))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        save_dicom_series(scan, tmp_path / "busy")
    assert os.listdir(tmp_path / "busy") == ["x"]
    (tmp_path / "empty").mkdir()
    save_dicom_series(scan, tmp_path / "empty")  # an empty folder is fine
    assert len(os.listdir(tmp_path / "empty")) == 3
    src = load_scan(tmp_path / "empty")
    with pytest.raises(OutputError):
        save_dicom_series(src, tmp_path / "empty")


def test_dicom_write_failure_leaves_nothing(tmp_path, monkeypatch):
    scan = small_scan(shape=(3, 6, 6))
    calls = {"n": 0}
    real = pydicom.Dataset.save_as

    def fail_on_second(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(pydicom.Dataset, "save_as", fail_on_second)
    with pytest.raises(OutputError, match="no space left"):
        save_dicom_series(scan, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def _edit(path, **changes):
    ds = pydicom.dcmread(path)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)


def test_dicom_error_no_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("no scans here")
    with pytest.raises(ScanFormatError, match="readme.txt: not a DICOM file"):
        load_scan(tmp_path)


def test_dicom_error_several_series(tmp_path):
    scan = small_scan(shape=(3, 6, 6))
    write_series(scan, tmp_path / "a", series_description="first")
    write_series(scan, tmp_path / "b", series_description="second")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for sub in ("a", "b"):
        for f in (tmp_path / sub).iterdir():
            shutil.copy(f, mixed / f"{sub}_{f.name}")
    uid_a = pydicom.dcmread(next((tmp_path / "a").iterdir())).SeriesInstanceUID
    with pytest.raises(ScanFormatError, match=r"2 DICOM series.*series_uid=") as e:
        load_scan(mixed)
    assert uid_a in str(e.value) and "\n" not in str(e.value)
    assert "first" not in str(e.value)  # SeriesDescription is free text: never quoted
    picked = load_scan(mixed, series_uid=uid_a)
    assert np.array_equal(picked.hu, scan.hu)
    with pytest.raises(ScanFormatError, match="no series 1.2.3"):
        load_scan(mixed, series_uid="1.2.3")


def test_dicom_error_missing_slice(tmp_path):
    files = write_series(small_scan(shape=(6, 6, 6)), tmp_path / "s")
    files[3].unlink()
    with pytest.raises(ScanFormatError, match="missing slice"):
        load_scan(tmp_path / "s")


def test_dicom_error_inconsistent_spacing(tmp_path):
    files = write_series(small_scan(shape=(6, 6, 6)), tmp_path / "s")
    ipp = [float(v) for v in pydicom.dcmread(files[3]).ImagePositionPatient]
    _edit(files[3], ImagePositionPatient=[ipp[0], ipp[1], ipp[2] + 0.9])
    with pytest.raises(ScanFormatError, match="inconsistent spacing"):
        load_scan(tmp_path / "s")


def test_dicom_error_pixel_spacing_differs(tmp_path):
    files = write_series(small_scan(shape=(4, 6, 6)), tmp_path / "s")
    _edit(files[2], PixelSpacing=[0.9, 0.8])
    with pytest.raises(ScanFormatError, match="PixelSpacing"):
        load_scan(tmp_path / "s")


def test_dicom_error_not_ct(tmp_path):
    files = write_series(small_scan(shape=(4, 6, 6)), tmp_path / "s")
    for f in files:
        _edit(f, Modality="MR")
    with pytest.raises(ScanFormatError, match="Modality is not CT"):
        load_scan(tmp_path / "s")


def test_dicom_error_compressed_without_decoder(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import MPEG2MPML

    with pytest.raises(NotImplementedError):  # pydicom has no decoder for video syntaxes
        get_decoder(MPEG2MPML)
    files = write_series(small_scan(shape=(3, 6, 6)), tmp_path / "s")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 30 + b"\xff\xd9"])
        ds.file_meta.TransferSyntaxUID = MPEG2MPML
        ds.save_as(f, enforce_file_format=True)
    with pytest.raises(ScanFormatError, match="compressed transfer syntax .* no decoder"):
        load_scan(tmp_path / "s")


def test_dicom_single_slice(tmp_path):
    """One file of a series named directly is refused (the rest of the series is elsewhere);
    a folder holding one slice is a volume of one slice (docs/safety.md#what-a-scan-may-be)."""
    scan = small_scan(shape=(3, 6, 6))
    files = write_series(scan, tmp_path / "s")
    with pytest.raises(ScanFormatError, match="single DICOM file of one slice; pass the folder"):
        load_scan(files[0])
    for f in files[1:]:
        f.unlink()
    one = load_scan(tmp_path / "s")
    assert one.shape == (1, 6, 6)
    np.testing.assert_array_equal(one.hu[0], scan.hu[0])


def test_dicom_error_nan_and_pixel_size(tmp_path):
    files = write_series(small_scan(shape=(3, 6, 6)), tmp_path / "s")
    ds = pydicom.dcmread(files[1])
    ds.PixelData = ds.PixelData[:-10]  # truncated pixel data
    ds.save_as(files[1], enforce_file_format=True)
    with pytest.raises(ScanFormatError, match=files[1].name):
        load_scan(tmp_path / "s")


def test_dciodvfy_passes(tmp_path):
    scan = small_scan(shape=(3, 8, 8), direction=rotation_zyx())
    save_dicom_series(scan, tmp_path / "s")
    errors = validate_dicom(tmp_path / "s")
    if errors is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) not installed")
    assert errors == []
    # The validator does find errors when there are some.
    f = sorted((tmp_path / "s").iterdir())[0]
    ds = pydicom.dcmread(f)
    del ds.SOPInstanceUID
    ds.save_as(f, enforce_file_format=False)
    assert validate_dicom(f)


# -- atomic helpers ----------------------------------------------------------------------------

def test_atomic_path_success_and_failure(tmp_path):
    target = tmp_path / "f.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"abc")
        assert not target.exists()
    assert target.read_bytes() == b"abc"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"abc"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_bytes_oserror(tmp_path, monkeypatch):
    atomic_write_bytes(tmp_path / "a", b"1")
    assert (tmp_path / "a").read_bytes() == b"1"
    with pytest.raises(OutputError, match="no_such_dir"):
        atomic_write_bytes(tmp_path / "no_such_dir" / "a", b"1")

    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", ro)
    with pytest.raises(OutputError, match="read-only file system") as e:
        atomic_write_bytes(tmp_path / "b", b"2")
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_atomic_dir(tmp_path):
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("1")
        assert not (tmp_path / "d").exists()
    assert (tmp_path / "d" / "x").read_text() == "1"
    with pytest.raises(OutputError, match="not empty"):
        with atomic_dir(tmp_path / "d"):
            pass
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "e") as tmp:
            (tmp / "y").write_text("1")
            raise ValueError
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_ensure_not_input(tmp_path):
    (tmp_path / "a.mhd").write_text("x")
    (tmp_path / "a.raw").write_text("x")
    with pytest.raises(OutputError, match="input"):
        ensure_not_input(tmp_path / "a.mhd", [tmp_path / "a.mhd"])
    with pytest.raises(OutputError):
        refuse_overwrite(tmp_path / "." / "a.mhd", str(tmp_path / "a.mhd"))
    with pytest.raises(OutputError):
        ensure_not_input(tmp_path, [tmp_path])
    with pytest.raises(OutputError, match="inside the input DICOM folder"):
        ensure_not_input(tmp_path / "sub" / "x", [tmp_path])
    ensure_not_input(tmp_path / "b.mhd", [tmp_path / "a.mhd", None])
    assert atomic.os_error_message("p", OSError(errno.ENOSPC, "x")) == "cannot write p: no space left on device"
