"""procedures.protection.bound: the per-location upper bound on what eps HU can do to CT-GAN."""
import json

import pytest

from conftest import make_phantom
from procedures.protection import bound as pgd_bound
from utils.errors import UsageError, run_cli
from utils.scan_io import Scan, save_mhd


@pytest.fixture(scope="module")
def scan_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("pgd") / "chest.mhd"
    save_mhd(Scan(make_phantom((24, 48, 48), seed=3), (2.5, 0.7, 0.7), (0.0, 0.0, 0.0)), p)
    return p


def test_bound_holds_and_beats_noise_of_the_same_rms(scan_path, tiny_ctgan_models, tmp_path, capsys):
    out = tmp_path / "bound.json"
    rc = run_cli(pgd_bound.main, ["--scan", str(scan_path), "--models", str(tiny_ctgan_models), "--eps", "20",
                                  "--steps", "15", "-n", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert len(doc["rows"]) == 4 and {r["action"] for r in doc["rows"]} == {"inject", "remove"}
    for r in doc["rows"]:
        assert 0 < r["perturbation_max_hu"] <= 20          # the bound, on every voxel, in integer HU
        assert r["perturbation_rms_cube_hu"] > 0 and r["disruption_rmse_hu"] > 0
    # Optimised through CT-GAN, the perturbation disrupts more than random noise of its RMS.
    assert doc["mean"]["disruption_rmse_hu"] > doc["mean"]["noise_disruption_rmse_hu"]
    assert "mean:" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--eps", "0"], ["--steps", "0"], ["--actions", "swap"], ["--bogus"]])
def test_bad_arguments_are_one_line_usage_errors(scan_path, tiny_ctgan_models, bad, capsys):
    rc = run_cli(pgd_bound.main, ["--scan", str(scan_path), "--models", str(tiny_ctgan_models), *bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == UsageError.exit_code and len(err) == 1 and err[0].startswith("error: ")
