"""evaluate.py / procedures.evaluation on tiny phantoms with a real tiny CT-GAN and a tiny
MITS-GAN checkpoint made by train.py."""
import csv
import json
import math

import numpy as np
import pytest
import torch

import evaluate
from procedures.evaluation.run import EvalSettings, evaluate as run_evaluation
from procedures.evaluation.methods import ProtectionMethod, eps_scaled_method, random_signs_method
from procedures.evaluation.reports import curve_report, pooled_psnr, write_reports
from procedures.evaluation.locations import sample_locations
from scanDataset import ScanDataset
from helpers import fake_lpips_state, make_tiny_checkpoint
from utils import metrics as M
from utils.errors import ModelFileError, UsageError, run_cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ctgan_models):
    root = tmp_path_factory.mktemp("eval")
    ckpt = make_tiny_checkpoint(root, tiny_ctgan_models)
    return root / "scans", ckpt, tiny_ctgan_models


@pytest.mark.tf
def test_every_column_on_a_phantom_with_two_locations(setup, tmp_path, capsys):
    data, ckpt, models = setup
    out = tmp_path / "eval"
    from conftest import build_tiny_ctgan_models

    holdout = build_tiny_ctgan_models(tmp_path / "holdout", seed=5)
    rc = run_cli(evaluate.main, ["--data", str(data), "--checkpoint", str(ckpt), "--models", str(models),
                                 "--holdout-models", str(holdout), "--out", str(out), "-n", "2",
                                 "--max-scans", "1", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    md = (out / "results.md").read_text()
    for col in ("protected MITS-GAN", "protected noise", "tampered MITS-GAN", "tampered noise",
                "protected random +-10 HU signs", "tampered random +-10 HU signs",
                "tampered, unprotected (CT-GAN(real))", "published: protected TAFIM"):
        assert md.count(col) >= 2, col                      # in both the slice and square tables
    assert "## Whole slice" in md and "## Tampered square only" in md
    assert "data range 1400 HU" in md and "window -1000..400 HU, range 1400" in md
    assert "n/a (weights unavailable)" in md
    assert "| 169.481 |" in md and "| 50.565 |" in md    # the published values beside ours

    rows = list(csv.DictReader(open(out / "results.csv")))
    samples = {(r["loc"], r["action"]) for r in rows}
    assert len(samples) == 4                                 # 2 locations x inject, remove
    assert {r["action"] for r in rows} == {"inject", "remove"}
    assert len(rows) == 4 * 7 * 2                            # samples x columns x regions
    assert all(r["lpips"] == "" for r in rows)               # never computed without weights
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["summary"]["table"]) == {"slice", "square"}
    assert len(doc["summary"]["table"]["square"]) == 7
    assert doc["scale"]["psnr"] == {"window_hu": [-1000.0, 400.0], "data_range_hu": 1400.0}
    assert (out / "qualitative_vol0.png").read_bytes()[:4] == b"\x89PNG"

    # Perturbation per method; the noise baseline has MITS-GAN's RMS.
    pert = {p["method"]: p for p in doc["perturbation"]}
    assert pert["mitsgan"]["rms_hu"] > 0
    assert pert["noise"]["rms_hu"] == pytest.approx(pert["mitsgan"]["rms_hu"], rel=0.05)
    # Random signs at the bound (the demo checkpoint is unbounded: 10 HU): every voxel +-10.
    assert pert["signs"]["max_hu"] == pert["signs"]["rms_hu"] == pytest.approx(10.0)
    # Disruption rows: every sample x method x attacker, amplification = disruption / perturbation.
    assert len(doc["disruption"]) == 4 * 3 * 2
    assert {d["attacker"] for d in doc["disruption"]} == {"seen", "unseen"}
    for d in doc["disruption"]:
        assert d["amplification"] > 0 and d["disruption_rmse_hu"] > 0
        assert -1 <= d["ssim_tampered_vs_unprotected"] <= 1
    # The two attackers really differ (another seed), on the same locations.
    by = {(d["loc"], d["action"], d["method"], d["attacker"]): d["disruption_rmse_hu"] for d in doc["disruption"]}
    assert any(by[k[:3] + ("seen",)] != by[k[:3] + ("unseen",)] for k in by)
    # The report ends with the held-out table: both attackers side by side, ratios to signs.
    tail = md[md.index("## Held-out protection (seen, unseen attackers)"):]
    assert "seen: x signs" in tail and "unseen: SSIM" in tail
    signs_row = next(l for l in tail.splitlines() if l.startswith("| random +-10 HU signs"))
    assert signs_row.count("| 1.00 |") == 2                  # the baseline against itself

    # CT-GAN changed every unprotected slice it tampered.
    unprot = [r for r in rows if r["kind"] == "tampered" and r["method"] == "none"]
    assert len(unprot) == 4 * 2
    assert all(float(r["rmse"]) > 0 and float(r["ssim"]) < 1 for r in unprot)


@pytest.mark.tf
def test_an_extra_method_is_one_entry_and_lpips_plumbing(setup, tmp_path):
    """The hook TAFIM will use: any (item) -> HU callable. LPIPS here runs with FAKE random
    weights (plumbing only: the numbers mean nothing)."""
    from procedures.attacker.pipeline import ScanManipulator

    data, _, models = setup
    torch.save(fake_lpips_state(), tmp_path / "fake_lpips.pt")
    lp = M.load_lpips(tmp_path / "fake_lpips.pt")
    plus10 = ProtectionMethod("plus10", "+10 HU", lambda item: item.scan.hu.astype(np.float32) + 10)
    items = [ScanDataset(data)[1]]
    res = run_evaluation(items, [plus10], ScanManipulator(models), EvalSettings(n_locations=1, actions=("inject",)),
                     tmp_path, lpips_model=lp)
    prot = [r for r in res.rows if r["kind"] == "protected"]
    assert {r["region"] for r in prot} == {"slice", "square"}
    for r in prot:
        assert r["rmse"] == pytest.approx(10.0)
        assert 0 < r["lpips"] < math.inf
    assert res.perturbation[0]["rms_hu"] == pytest.approx(10.0)
    assert res.disruption[0]["perturbation_rms_cube_hu"] == pytest.approx(10.0)
    paths = write_reports(res, tmp_path)
    md = paths["md"].read_text()
    assert "protected +10 HU" in md and "tampered +10 HU" in md and "n/a (weights" not in md


def test_locations_inside_the_lungs_and_from_csv(tmp_path):
    from conftest import make_phantom
    from utils.lung import lung_mask
    from utils.scan_io import Scan, save_mhd

    scan = Scan(make_phantom((30, 48, 48), seed=0), (2.5, 0.7, 0.7), (0.0, 0.0, 0.0))
    save_mhd(scan, tmp_path / "a.mhd")
    item = ScanDataset(tmp_path)[0]
    locs = sample_locations(item, 3, seed=1)
    assert len(locs) == 6 and [l.action for l in locs[:2]] == ["inject", "remove"]
    mask = lung_mask(item.scan.hu)
    assert all(mask[l.vox] for l in locs)
    assert locs == sample_locations(item, 3, seed=1)       # seeded
    assert locs != sample_locations(item, 3, seed=2)
    # CSV mode: inject at healthy.csv, remove at nodules.csv; world coordinates converted.
    (tmp_path / "healthy.csv").write_text("filename,z,y,x,coord\na.mhd,10,20,12,vox\nb.mhd,1,1,1,vox\n")
    (tmp_path / "nodules.csv").write_text("filename,z,y,x,coord\na.mhd,25.0,14.1,21.1,world\n")
    locs = sample_locations(item, 5, mode="csv")
    assert [(l.action, l.vox) for l in locs] == [("inject", (10, 20, 12)), ("remove", (10, 20, 30))]


def test_cli_errors_are_one_line(tmp_path, capsys):
    rc = run_cli(evaluate.main, ["--methods", "mitsgan,magic"])
    assert rc == UsageError.exit_code and "unknown method(s) magic" in capsys.readouterr().err
    rc = run_cli(evaluate.main, ["--methods", "noise"])
    assert rc == UsageError.exit_code and "--noise-rms" in capsys.readouterr().err
    rc = run_cli(evaluate.main, ["--methods", "signs", "--locations", "targets"])
    assert rc == UsageError.exit_code and "needs --targets" in capsys.readouterr().err
    rc = run_cli(evaluate.main, ["--methods", "signs", "--curve", "5,x"])
    assert rc == UsageError.exit_code and "--curve" in capsys.readouterr().err
    (tmp_path / "empty.csv").write_text("")
    rc = run_cli(evaluate.main, ["--methods", "signs", "--targets", str(tmp_path / "empty.csv"),
                                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 3 and err.count("\n") == 1 and "empty.csv" in err and not (tmp_path / "o").exists()
    # Missing attacker models fail before any scan is protected (and before TensorFlow loads).
    (tmp_path / "scans").mkdir()
    from conftest import make_phantom
    from utils.scan_io import Scan, save_mhd
    save_mhd(Scan(make_phantom((8, 32, 32)), (2.5, 1, 1), (0, 0, 0)), tmp_path / "scans" / "s.mhd")
    rc = run_cli(evaluate.main, ["--methods", "noise", "--noise-rms", "5", "--data", str(tmp_path / "scans"),
                                 "--models", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == ModelFileError.exit_code and err.count("\n") == 1 and "model folder not found" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.tf
def test_a_second_mitsgan_checkpoint_gets_its_own_columns(setup, tmp_path, capsys):
    data, ckpt, models = setup
    out = tmp_path / "eval2"
    rc = run_cli(evaluate.main, ["--data", str(data), "--checkpoint", str(ckpt), "--checkpoint2", str(ckpt),
                                 "--methods", "mitsgan,mitsgan2,mitsgan2_float", "--models", str(models),
                                 "--out", str(out), "-n", "1", "--max-scans", "1", "--no-progress", "--no-figures"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    pert = {p["method"]: p["rms_hu"] for p in doc["perturbation"]}
    assert set(pert) == {"mitsgan", "mitsgan2", "mitsgan2_float"}
    assert pert["mitsgan2"] == pytest.approx(pert["mitsgan"])  # the same checkpoint, the same seed
    md = (out / "results.md").read_text()
    assert "MITS-GAN 2 (" in md and "float (not stored)" in md
    # Float = the network's output before int16 storage: within 0.5 HU of the stored one
    # (rounding), on every voxel, and a different column.
    item = ScanDataset(data)[0]
    ctx = {"device": torch.device("cpu"), "progress": None, "methods": {}}
    args = evaluate.build_parser().parse_args(["--checkpoint2", str(ckpt), "--data", str(data)])
    for n in ("mitsgan2", "mitsgan2_float"):
        ctx["methods"][n] = evaluate.METHODS[n](args, ctx)
    stored, flt = (ctx["methods"][n].protect(item) for n in ("mitsgan2", "mitsgan2_float"))
    assert stored.dtype == item.scan.hu.dtype and flt.dtype == np.float32
    assert np.abs(stored.astype(np.float64) - flt).max() <= 0.5 + 1e-3
    assert not np.array_equal(stored, flt)
    # The float column needs its stored column first.
    rc = run_cli(evaluate.main, ["--data", str(data), "--checkpoint2", str(ckpt), "--methods", "mitsgan2_float",
                                 "--models", str(models), "--out", str(tmp_path / "e4"), "--no-progress"])
    assert rc == UsageError.exit_code
    # Without --checkpoint2 the method is a one-line usage error.
    rc = run_cli(evaluate.main, ["--data", str(data), "--methods", "mitsgan2", "--models", str(models),
                                 "--out", str(tmp_path / "e3"), "--no-progress"])
    assert rc == UsageError.exit_code


def test_pooled_psnr_is_finite_when_one_sample_is_identical():
    assert pooled_psnr([30.0, 30.0]) == pytest.approx(30.0)
    # 20 dB = normalised MSE 0.01; an identical sample adds MSE 0: mean 0.005 = 23.01 dB.
    assert pooled_psnr([20.0, math.inf]) == pytest.approx(10 * math.log10(200))
    assert pooled_psnr([math.inf, math.inf]) == math.inf
    assert pooled_psnr([]) is None and pooled_psnr([float("nan"), 40.0]) == pytest.approx(40.0)
    # Never above the mean of the per-sample PSNRs (Jensen): the worst samples weigh more.
    vals = [12.0, 25.0, 41.0]
    assert pooled_psnr(vals) < np.mean(vals)


def test_held_out_locations_around_targets_and_baselines(tmp_path):
    """--locations targets: offsets of odd parity (the targeted protection trains on even ones)
    within +-2 voxels, from the evaluation's own stream; the signs and eps-scaled methods."""
    from conftest import make_phantom
    from procedures.protection.targeted import read_target_rows
    from utils.scan_io import Scan, save_mhd

    save_mhd(Scan(make_phantom((30, 48, 48), seed=0), (2.5, 0.7, 0.7), (0.0, 0.0, 0.0)), tmp_path / "a.mhd")
    item = ScanDataset(tmp_path)[0]
    (tmp_path / "t.csv").write_text("filename,z,y,x\na.mhd,15,20,30\nb.mhd,1,1,1\n")
    rows = read_target_rows(tmp_path / "t.csv")
    locs = sample_locations(item, 5, seed=0, mode="targets", targets=rows)
    assert len(locs) == 10 and {l.action for l in locs} == {"inject", "remove"}
    offs = {(l.z - 15, l.y - 20, l.x - 30) for l in locs}
    assert len(offs) == 5 and all(max(map(abs, o)) <= 2 and sum(o) % 2 == 1 for o in offs)
    assert locs == sample_locations(item, 5, seed=0, mode="targets", targets=rows)
    assert locs != sample_locations(item, 5, seed=1, mode="targets", targets=rows)

    hu = item.scan.hu
    signs = random_signs_method(7).protect(item) - hu
    assert set(np.unique(signs)) == {-7.0, 7.0}
    plus = ProtectionMethod("g", "g", lambda it: it.scan.hu.astype(np.float32) + np.float32(4.0), stored=False)
    half = eps_scaled_method(plus, 5, 10, name="g", label="g at 5").protect(item) - hu
    clip = eps_scaled_method(plus, 3, 0, name="g", label="g at 3").protect(item) - hu
    assert np.allclose(half, 2.0) and np.allclose(clip, 3.0)   # bounded: scaled; unbounded: clipped


def test_curve_report_draws_one_panel_per_attacker(tmp_path):
    curve = {a: {"signs": {"label": "s", "eps": [5.0, 10.0], "disruption": [10.0, 20.0], "ssim": [0.9, 0.8], "n": [4, 4]},
                 "targeted": {"label": "t", "eps": [5.0, 10.0], "disruption": [30.0, 60.0], "ssim": [0.7, 0.5], "n": [4, 4]}}
             for a in ("seen", "unseen")}
    lines = curve_report(curve, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    md = "\n".join(lines)
    assert "| seen attacker | eps 5 HU | eps 10 HU |" in md and "| targeted | 30.0 (0.700) | 60.0 (0.500) |" in md
