"""A sealed scan tampered by CT-GAN (a tiny stand-in pair of the real models): the map is exactly
the blocks in which a stored voxel changed, and holds the tamper's centre (docs/seal.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import protect
import tamper
import verify
from conftest import make_phantom
from helpers import call
from procedures.evaluation.locations import Location
from procedures.protection.seal import changed_blocks, seal_volume, verify_volume
from procedures.protection.seal_report import tamper_regions
from utils.scan_io import Scan, load_scan, save_mhd

SPACING = (1.25, 1.0, 1.0)
CENTRE = (30, 48, 60)


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("seal_attack") / "chest.mhd"
    save_mhd(Scan(make_phantom((60, 96, 96), seed=2), SPACING, (-100.0, 20.0, -40.0)), p)
    return p


@pytest.mark.tf
def test_tamper_py_on_a_sealed_scan_is_mapped_exactly(scan_file, tmp_path, capfd,
                                                      tiny_ctgan_models):
    key = tmp_path / "seal.key"
    assert call(verify.main, ["--make-key", key], capfd).rc == 0
    res = call(protect.main, [scan_file, "--seal", key, "-o", tmp_path / "sealed"], capfd)
    assert res.rc == 0, res.err
    sealed = tmp_path / "sealed" / "chest_protected.mhd"
    res = call(tamper.main, ["-t", sealed, "-d", tmp_path / "t", "-a", "inject", "-c",
                             ",".join(map(str, CENTRE)), "--models", tiny_ctgan_models], capfd)
    assert res.rc == 0, res.err
    tampered = tmp_path / "t" / "chest_protected_tampered.mhd"
    a, b = load_scan(sealed), load_scan(tampered)
    truth = changed_blocks(a.hu, b.hu, 8)
    assert truth.sum() > 20
    v = verify_volume(b.hu, key.read_bytes())
    assert np.array_equal(v.failed, truth)                       # recall and precision 100%
    regions = tamper_regions(v, b)
    assert any(r.contains(CENTRE) for r in regions)
    res = call(verify.main, [tampered, "--key", key], capfd)
    assert res.rc == 10 and "region 1: slices" in res.out


@pytest.mark.tf
@pytest.mark.parametrize("action", ["inject", "remove"])
def test_evaluation_row_matches_the_truth(scan_file, tmp_path, tiny_ctgan_models, action):
    """procedures.evaluation.seal_eval's tamper, as tamper.py does it, file round trip included."""
    from procedures.attacker.pipeline import ScanManipulator
    from procedures.evaluation.seal_eval import tamper_row

    scan = load_scan(scan_file)
    key = bytes(32)
    sealed = seal_volume(scan.hu, key)
    loc = Location("chest.mhd", 24, 40, 30, action=action, source="test")
    row = tamper_row(ScanManipulator(tiny_ctgan_models), scan, sealed, loc, key, 8, tmp_path)
    assert row["detected"] and row["exact"] and row["centre_flagged"]
    assert row["recall"] == row["precision"] == 1.0 and row["changed_blocks"] > 0
    assert row["changed_outside_footprint"] == 0   # tamper.py and the writers touch nothing else


@pytest.mark.tf
def test_evaluate_seal_reports_both_attackers(tmp_path, capfd, tiny_ctgan_models):
    """evaluate.py --seal on a phantom folder: every tamper flagged, the map exactly the truth,
    no false alarm on the untampered sealed scan; seal.md and seal.json written."""
    import json

    import evaluate

    data = tmp_path / "scans"
    data.mkdir()
    save_mhd(Scan(make_phantom((60, 128, 128), seed=5), SPACING, (0.0, 0.0, 0.0)), data / "a.mhd")
    res = call(evaluate.main, ["--seal", "--data", data, "--models", tiny_ctgan_models,
                               "--holdout-models", tiny_ctgan_models, "-n", "1", "--out",
                               tmp_path / "out", "--no-progress"], capfd)
    assert res.rc == 0, res.err
    got = json.loads((tmp_path / "out" / "seal.json").read_text())
    rows = got["rows"]
    assert {r["attacker"] for r in rows} == {"seen", "unseen"} and len(rows) == 4
    assert all(r["detected"] and r["exact"] and r["centre_flagged"] for r in rows)
    assert got["clean"][0]["false_blocks"] == 0 and got["clean"][0]["max_change_hu"] == 1
    table = (tmp_path / "out" / "seal.md").read_text()
    assert "| seen | 2 | 2/2 | 2/2 | 100.0% | 100.0% | 2/2 |" in table
