"""tamper.py: exit codes, one-line errors, no partial output, and a real tamper end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tamper
from conftest import ROOT, build_tiny_ctgan_models, make_phantom
from utils.errors import run_cli
from utils.scan_io import Scan, load_numpy, load_scan, save_mhd

SPACING = (1.25, 1.0, 1.0)


@pytest.fixture
def scan_file(tmp_path):
    p = tmp_path / "in" / "chest.mhd"
    p.parent.mkdir()
    save_mhd(Scan(make_phantom((60, 96, 96), seed=2), SPACING, (-100.0, 20.0, -40.0)), p)
    return p


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_tiny_ctgan_models(tmp_path_factory.mktemp("ctgan_cli"))


def run(argv, capsys):
    rc = run_cli(tamper.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, code, *words):
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0]


def write_mr_series(folder: Path, n=3):
    """A tiny valid MR series (pydicom), which tamper.py must refuse as not CT."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True)
    series, study = generate_uid(), generate_uid()
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, uid, "MR"
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.InstanceNumber = series, study, k + 1
        ds.ImagePositionPatient = [0, 0, 5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [1, 1], 5
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.PixelData = np.zeros((8, 8), "<i2").tobytes()
        ds.save_as(folder / f"MR{k}.dcm", enforce_file_format=True)
    return folder


def test_missing_scan_file(tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(["-t", tmp_path / "nope.mhd", "-d", out, "-a", "inject", "-c", "1,2,3"], capsys)
    assert_one_line_error(rc, err, 3, "nope.mhd")
    assert not out.exists()


@pytest.mark.parametrize("coord", ["30,48", "30;48;60", "a,b,c", "30,48,60,1", "30,,60"])
def test_bad_coordinate_text(scan_file, tmp_path, capsys, coord):
    out = tmp_path / "out"
    rc, _, err = run(["-t", scan_file, "-d", out, "-a", "inject", "-c", coord], capsys)
    assert_one_line_error(rc, err, 5, "bad coordinate")
    assert not out.exists()


def test_coordinate_outside_the_scan(scan_file, tmp_path, capsys):
    out = tmp_path / "out"
    models = tmp_path / "no_models"   # coordinates are checked before any model is looked for
    rc, _, err = run(["-t", scan_file, "-d", out, "-a", "inject", "-c", "30,48,60", "-c", "30,48,96",
                      "--models", models], capsys)
    assert_one_line_error(rc, err, 5, "outside the scan", "(60, 96, 96)")
    assert not out.exists()
    rc, _, err = run(["-t", scan_file, "-d", out, "-a", "inject", "-s", "world", "-c", "-100,20,-400",
                      "--models", models], capsys)
    assert_one_line_error(rc, err, 5, "outside the scan")
    assert not out.exists()


def test_non_ct_dicom(tmp_path, capsys):
    mr = write_mr_series(tmp_path / "mr")
    out = tmp_path / "out"
    rc, _, err = run(["-t", mr, "-d", out, "-a", "remove", "-c", "1,4,4"], capsys)
    assert_one_line_error(rc, err, 4, "MR", "not CT")
    assert not out.exists()


def test_missing_model_folder(scan_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(["-t", scan_file, "-d", out, "-a", "remove", "-c", "30,48,60",
                      "--models", tmp_path / "no_models"], capsys)
    assert_one_line_error(rc, err, 6, "no_models", "model folder not found")
    assert not out.exists()


def test_published_resampling_refuses_5mm_slices(tmp_path, capsys):
    p = tmp_path / "thick.mhd"
    save_mhd(Scan(make_phantom((12, 96, 96)), (5.0, 0.7, 0.7), (0.0, 0.0, 0.0)), p)
    out = tmp_path / "out"
    rc, _, err = run(["-t", p, "-d", out, "-a", "inject", "-c", "6,48,60", "--published-resample",
                      "--models", tmp_path / "no_models"], capsys)
    assert_one_line_error(rc, err, 4, "thick.mhd", "round(round(32/5.0)*5.0)=30 != 32", "data/z2.5")
    assert not out.exists()


@pytest.mark.parametrize("argv", [[], ["-t", "x.mhd", "-d", "o", "-a", "paint", "-c", "1,2,3"],
                                  ["-t", "x.mhd", "-d", "o", "-a", "inject", "-c", "1,2,3", "--seed", "x"]])
def test_argparse_errors_are_one_line(argv, capsys):
    rc, _, err = run(argv, capsys)
    assert_one_line_error(rc, err, 2)


def test_script_exit_code_in_a_subprocess(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tamper.py"), "-t", str(tmp_path / "gone.mhd"), "-d",
                        str(tmp_path / "o"), "-a", "inject", "-c", "1,2,3"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 3
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'gone.mhd'}: no such file or folder"]


@pytest.mark.tf
def test_tamper_mhd_end_to_end(scan_file, tmp_path, capsys, models):
    original = load_scan(scan_file)
    out = tmp_path / "out"
    rc, stdout, err = run(["-t", scan_file, "-d", out, "-a", "inject", "-c", "30,48,60", "-c", "20,40,30",
                           "--models", models], capsys)
    assert rc == 0, err
    assert stdout.count(" s\n") >= 3 and "inject 2/2" in stdout        # time per tamper printed
    res = load_scan(out / "chest_tampered.mhd")
    assert res.hu.shape == original.hu.shape and res.hu.dtype == np.int16
    np.testing.assert_allclose(res.spacing, original.spacing)
    np.testing.assert_allclose(res.origin, original.origin)
    assert (res.hu != original.hu).sum() > 1000
    np.testing.assert_array_equal(load_scan(scan_file).hu, original.hu)   # input untouched
    assert sorted(p.name for p in out.iterdir()) == ["chest_tampered.mhd", "chest_tampered.raw"]

    # world coordinates and NumPy output give the same tampering as voxel coordinates
    world = original.vox2world((30, 48, 60))
    rc, _, err = run(["-t", scan_file, "-d", out, "-a", "remove", "-s", "world", "-f", "numpy",
                      "-c", ",".join(f"{v:.6f}" for v in world), "--models", models], capsys)
    assert rc == 0, err
    rc, _, err = run(["-t", scan_file, "-d", tmp_path / "vox", "-a", "remove", "-f", "numpy",
                      "-c", "30,48,60", "--models", models], capsys)
    assert rc == 0, err
    a, b = load_numpy(out / "chest_tampered.npy"), load_numpy(tmp_path / "vox" / "chest_tampered.npy")
    np.testing.assert_array_equal(a.hu, b.hu)
    assert (a.hu != original.hu).any()
