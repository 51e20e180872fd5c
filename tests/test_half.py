"""procedures.data.half: the half in-plane resolution scans of the CPU-sized experiments."""
from __future__ import annotations

import numpy as np

from conftest import make_phantom
from procedures.data import half as H
from utils.errors import run_cli
from utils.scan import Scan
from utils.scan_io import load_scan, save_mhd


def test_blocks_are_averaged_rounded_and_geometry_follows():
    hu = np.full((3, 5, 7), -1000, np.int16)          # odd rows and columns: the last is dropped
    hu[:, 0:2, 0:2] = [[10, 20], [30, 41]]             # block mean 25.25 -> 25
    hu[:, 2:4, 4:6] = [[-3, -4], [-4, -4]]             # block mean -3.75 -> -4
    hu[:, 4, :] = 3000                                 # the dropped row
    hu[:, :, 6] = 3000                                 # the dropped column
    scan = Scan(hu, (2.5, 0.7, 0.6), (1.0, 2.0, 3.0))
    out = H.halve(scan)
    assert out.hu.dtype == np.int16 and out.hu.shape == (3, 2, 3)
    assert (out.hu[:, 0, 0] == 25).all() and (out.hu[:, 1, 2] == -4).all()
    assert (out.hu[:, 0, 1] == -1000).all() and out.hu.max() < 3000
    np.testing.assert_allclose(out.spacing, (2.5, 1.4, 1.2))
    np.testing.assert_allclose(out.origin, (1.0, 2.0, 3.0))


def test_cli_writes_once_verifies_after_and_never_overwrites(tmp_path):
    data, out = tmp_path / "scans", tmp_path / "half"
    data.mkdir()
    hu = make_phantom((8, 40, 40), seed=1)
    save_mhd(Scan(hu, (2.5, 1.0, 1.0), (0.0, 0.0, 0.0)), data / "lung7.mhd")
    argv = ["--data", str(data), "--out", str(out)]
    assert run_cli(H.main, argv) == 0
    got = load_scan(out / "lung7.mhd")
    assert got.hu.shape == (8, 20, 20)
    assert abs(float(got.hu.mean()) - float(hu.mean())) < 1.0   # averaging keeps the mean
    raw = (out / "lung7.raw").read_bytes()
    assert run_cli(H.main, argv) == 0 and (out / "lung7.raw").read_bytes() == raw
    save_mhd(Scan(got.hu + 1, got.spacing, got.origin), tmp_path / "other.mhd")
    (out / "lung7.raw").write_bytes((tmp_path / "other.raw").read_bytes())
    assert run_cli(H.main, argv) != 0                             # other content: refused
    assert run_cli(H.main, ["--data", str(data), "--out", str(data)]) != 0
