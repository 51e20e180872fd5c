"""prepare_data: the two real chest CTs (docs/data.md), their CSVs, and real-scan I/O."""
from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from procedures.data import prepare as pdata
from utils.errors import DataFetchError
from utils.scan_io import Scan, load_scan, save_dicom_series, save_mhd, validate_dicom

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
ARGS = ["--data-dir", str(DATA), "--cache", str(ROOT / ".cache")]
NODULES_NATIVE = {"lung1.mhd": (33, 359, 218), "lung2.mhd": (21, 365, 356)}  # docs/data.md#the-two-real-scans


@pytest.fixture(scope="module")
def prepared() -> Path:
    assert pdata.main(ARGS) == 0  # fetches on the first run, verifies afterwards
    return DATA


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.realdata
def test_idempotent_and_check(prepared, capsys):
    files = pdata.expected_outputs(prepared)
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert pdata.main(ARGS) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    assert pdata.main([*ARGS, "--check"]) == 0


@pytest.mark.realdata
@pytest.mark.parametrize("folder,slices,dz", [("native", (48, 61), 5.0), ("z2.5", (95, 121), 2.5)])
def test_real_scans_geometry(prepared, folder, slices, dz):
    for name, n, sp in zip(("lung1", "lung2"), slices, (0.5703125, 0.6269531)):
        s = load_scan(prepared / folder / f"{name}.mhd")
        assert s.hu.dtype == np.int16
        assert s.shape == (n, 512, 512)
        np.testing.assert_allclose(s.spacing, (dz, sp, sp), atol=1e-5)
        assert -1100 < s.hu.min() <= -1000 and s.hu.max() > 1000


@pytest.mark.realdata
def test_z25_keeps_native_slices(prepared):
    """grid_mode=False resampling: every even 2.5 mm slice is the native 5 mm slice."""
    a = load_scan(prepared / "native" / "lung1.mhd")
    b = load_scan(prepared / "z2.5" / "lung1.mhd")
    np.testing.assert_allclose(b.origin, a.origin)
    assert np.array_equal(b.hu[::2], a.hu)
    mid = b.hu[1::2].astype(np.float64)
    assert np.abs(mid - (a.hu[:-1] + a.hu[1:].astype(np.float64)) / 2).mean() < 60


@pytest.mark.realdata
@pytest.mark.parametrize("folder", ["native", "z2.5"])
def test_csvs(prepared, folder):
    nod = rows(prepared / folder / "nodules.csv")
    healthy = rows(prepared / folder / "healthy.csv")
    assert list(nod[0]) == pdata.CSV_HEADER
    assert {r["filename"] for r in nod} == {"lung1.mhd", "lung2.mhd"}
    scans = {n: load_scan(prepared / folder / n) for n in ("lung1.mhd", "lung2.mhd")}
    native = {n: load_scan(prepared / "native" / n) for n in scans}
    for r in nod:
        s = scans[r["filename"]]
        vox = np.array([int(r["z"]), int(r["y"]), int(r["x"])])
        assert r["coord"] == "vox"
        world = np.array([float(r["world_z"]), float(r["world_y"]), float(r["world_x"])])
        np.testing.assert_allclose(s.vox2world(vox), world, atol=1e-2)
        spec_world = native[r["filename"]].vox2world(NODULES_NATIVE[r["filename"]])
        assert np.linalg.norm(world - spec_world) < 4.0  # within a few voxels (mm) of the documented centre
        assert s.hu[tuple(vox)] > -500  # the nodule is solid tissue
    for name in scans:
        assert sum(r["filename"] == name for r in healthy) == pdata.N_HEALTHY
    for r in healthy:
        s = scans[r["filename"]]
        vox = (int(r["z"]), int(r["y"]), int(r["x"]))
        assert all(0 <= v < n for v, n in zip(vox, s.shape))
        assert s.hu[vox] < -500
        ratio = round(5.0 / s.spacing[0])
        assert pdata.END_SLICES * ratio <= vox[0] <= s.shape[0] - 1 - pdata.END_SLICES * ratio
        w = s.vox2world(vox)
        for n in nod:
            if n["filename"] == r["filename"]:
                nw = np.array([float(n["world_z"]), float(n["world_y"]), float(n["world_x"])])
                assert np.linalg.norm(w - nw) >= pdata.MIN_NODULE_DIST_MM - 2.5


@pytest.mark.realdata
def test_real_scan_mhd_round_trip(prepared, tmp_path):
    s = load_scan(prepared / "native" / "lung2.mhd")
    back = load_scan(save_mhd(s, tmp_path / "copy.mhd"))
    assert np.array_equal(back.hu, s.hu)
    np.testing.assert_allclose(back.spacing, s.spacing)
    np.testing.assert_allclose(back.origin, s.origin)


@pytest.mark.realdata
def test_real_scan_dicom_round_trip_and_dciodvfy(prepared, tmp_path):
    s = load_scan(prepared / "native" / "lung1.mhd")
    save_dicom_series(s, tmp_path / "dcm")
    files = sorted((tmp_path / "dcm").iterdir())
    assert len(files) == 48
    back = load_scan(tmp_path / "dcm")
    assert np.array_equal(back.hu, s.hu)
    np.testing.assert_allclose(back.spacing, s.spacing, atol=1e-6)
    np.testing.assert_allclose(back.origin, s.origin, atol=1e-6)
    errors = validate_dicom(tmp_path / "dcm")
    if errors is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) not installed")
    assert errors == []


# -- offline behaviour and helpers (no real data needed) ---------------------------------------

def test_offline_gives_one_line_fetch_error(tmp_path, monkeypatch):
    def fake_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying...\nERROR: Could not find a version "
                                                        "that satisfies the requirement pyradiomics-bhklab==3.1.4\n")

    monkeypatch.setattr(pdata.subprocess, "run", fake_run)
    with pytest.raises(DataFetchError, match=r"could not download pyradiomics-bhklab from PyPI: .* are you offline\?") as e:
        pdata.main(["--data-dir", str(tmp_path / "d"), "--cache", str(tmp_path / "c")])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "d" / "native").exists()


def test_wrong_sdist_refused(tmp_path):
    bad = tmp_path / pdata.SDIST
    bad.write_bytes(b"not the package")
    with pytest.raises(DataFetchError, match="SHA-256 mismatch"):
        pdata.main(["--data-dir", str(tmp_path / "d"), "--sdist", str(bad)])


def test_check_reports_missing_data(tmp_path):
    with pytest.raises(DataFetchError, match="data not prepared"):
        pdata.main(["--data-dir", str(tmp_path), "--check"])
    assert os.listdir(tmp_path) == []


def test_resample_z_grid():
    hu = np.random.default_rng(0).integers(-1000, 400, size=(5, 4, 3)).astype(np.int16)
    s = Scan(hu=hu, spacing=(5.0, 0.7, 0.7), origin=(10, 0, 0))
    r = pdata.resample_z(s, 2.5, order=3)
    assert r.shape == (9, 4, 3) and r.hu.dtype == np.int16
    assert np.array_equal(r.hu[::2], hu)
    assert r.hu.min() >= hu.min() and r.hu.max() <= hu.max()
    np.testing.assert_allclose(r.spacing, (2.5, 0.7, 0.7))
    lab = pdata.resample_z(Scan(hu=(hu > 0).astype(np.int16), spacing=s.spacing, origin=s.origin), 2.5, order=0)
    assert set(np.unique(lab.hu)) <= {0, 1}


def test_nodule_centres():
    lab = np.zeros((10, 20, 20), np.int16)
    lab[2:5, 3:6, 4:7] = 1
    lab[7:10, 14:17, 10:13] = 1
    assert sorted(pdata.nodule_centres(lab)) == [(3, 4, 5), (8, 15, 11)]
