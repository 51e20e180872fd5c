"""procedures.protection.ceiling: one bounded integer perturbation per scan optimised through the
differentiable attack (step 8 included) at fresh in-lung locations, on tiny phantoms with a real
tiny CT-GAN; and its evaluate.py method."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from conftest import make_phantom
from procedures.evaluation.locations import sample_locations
from procedures.protection import ceiling as C
from scanDataset import VolumeItem
from utils.errors import InputFileError, run_cli
from utils.lung import lung_mask
from utils.scan_io import Scan

SPACING = (2.5, 1.0, 1.0)       # cut 13 x 32 x 32, reference cube 41
SHAPE = (40, 80, 80)


@pytest.fixture(scope="module")
def hu():
    return make_phantom(SHAPE, seed=3)


@pytest.fixture(scope="module")
def dt(tiny_ctgan_models):
    from procedures.attacker.model_dir import load_attacker_pair

    return load_attacker_pair(tiny_ctgan_models, touchups="copy")


def _disruption_at(opt, c) -> float:
    """Mean disruption (HU) of the optimiser's current d at centre c, both actions."""
    got = opt._tamper(None, [c])
    ref = opt._tamper(opt.real, [c])
    return float(np.mean([C.rmse_hu(a, b) for a, b in zip(got, ref)]))


def _settings(**kw):
    return C.CeilingSettings(**{"steps": 3, "eval_every": 2, "curve_locations": 2, "method": "pgd",
                                **kw})


def test_bound_integers_and_seeded_determinism(dt, hu):
    d1, c1 = C.optimise_scan(dt, hu, SPACING, "a.mhd", _settings(eps=6))
    d2, c2 = C.optimise_scan(dt, hu, SPACING, "a.mhd", _settings(eps=6))
    d3, _ = C.optimise_scan(dt, hu, SPACING, "a.mhd", _settings(eps=6, seed=1))
    assert d1.dtype == np.int8 and d1.shape == hu.shape
    assert np.abs(d1).max() <= 6 and np.abs(d1).max() == 6
    assert np.array_equal(d1, d2) and json.dumps(c1) == json.dumps(c2)
    assert not np.array_equal(d1, d3)
    assert c1["step"] == [0, 2, 3] and len(c1["heldout_hu"]) == 3 and np.isnan(c1["train_hu"][0])


def test_locations_are_fresh_in_lung_and_never_the_evaluations(dt, hu):
    opt = C.CeilingOptimiser(dt, hu, SPACING, "a.mhd", _settings(curve_locations=3))
    for t in range(4):
        opt.step(t)
    assert len(set(opt.seen)) == 4                            # a new location every step
    mask = lung_mask(hu)
    assert all(mask[c] for c in opt.seen + opt.curve_set)
    stream = C.location_stream(hu, SPACING, "a.mhd", 0)
    train = {next(stream) for _ in range(300)}
    assert set(opt.seen) <= train                            # the steps drew from that stream
    scan = Scan(hu, SPACING, (0.0, 0.0, 0.0))
    item = VolumeItem(torch.zeros(1), -1024.0, 3071.0, 0, "a.mhd", scan)
    for seed in (0, 1):
        evaluation = {loc.vox for loc in sample_locations(item, 12, seed=seed)}
        assert not evaluation & train and not evaluation & set(opt.curve_set)


def test_disruption_on_the_training_attacker_increases(dt, hu):
    """Sign-gradient steps raise the disruption where they were taken."""
    opt = C.CeilingOptimiser(dt, hu, SPACING, "a.mhd", _settings(steps=6, lr=0.3))
    c = opt.curve_set[0]
    opt.train_stream = itertools.repeat(c)
    at_c = lambda: _disruption_at(opt, c)  # noqa: E731

    before = at_c()
    during = [opt.step(t) for t in range(6)]
    assert at_c() > before + 1.0 and during[-1] > during[0]
    assert np.abs(opt.perturbation()).max() <= 10


def test_cli_writes_int8_perturbations_that_evaluate_reads(tmp_path, tiny_ctgan_models, hu):
    from procedures.benchmarking.benchmark import write_scan
    from procedures.evaluation.methods import ceiling_method

    data = tmp_path / "scans"
    data.mkdir()
    write_scan(hu, SPACING, data / "lung9.mhd")
    out = tmp_path / "ceiling"
    base = ["--data", str(data), "--models", str(tiny_ctgan_models), "--out", str(out)]
    rc = run_cli(C.main, base + ["--steps", "2", "--eval-every", "1", "--curve-locations", "1",
                                 "--no-progress"])
    assert rc == 0
    d = np.load(out / "lung9.npy")
    report = json.loads((out / "lung9.json").read_text())
    assert d.dtype == np.int8 and report["step"] == [0, 1, 2] and report["scan"] == "lung9.mhd"
    from scanDataset import ScanDataset

    item = ScanDataset(data)[0]
    protected = ceiling_method(out, eps=10).protect(item)
    np.testing.assert_array_equal(protected - item.scan.hu.astype(np.float32), d)
    with pytest.raises(InputFileError, match="no ceiling perturbation"):
        ceiling_method(tmp_path / "nowhere", eps=10).protect(item)
    np.save(out / "lung9.npy", (d * 2).astype(np.int8))         # a file over the bound is refused
    with pytest.raises(InputFileError, match="exceeds"):
        ceiling_method(out, eps=10).protect(item)
    assert run_cli(C.main, base + ["--scans", "lung8.mhd"]) == 2          # not in the folder


def test_vertex_keeps_every_voxel_at_eps_and_raises_disruption(dt, hu):
    """The vertex optimiser never leaves the ball's vertices and still learns where it steps."""
    opt = C.CeilingOptimiser(dt, hu, SPACING, "a.mhd",
                             _settings(steps=6, lr=1.0, method="vertex", eps=8))
    start = opt.perturbation().copy()
    c = opt.curve_set[0]
    opt.train_stream = itertools.repeat(c)
    at_c = lambda: _disruption_at(opt, c)  # noqa: E731

    before = at_c()
    for t in range(6):
        opt.step(t)
        assert set(np.unique(opt.perturbation())) == {-8, 8}
    d = opt.perturbation()
    assert at_c() > before + 1.0
    flipped = d != start
    assert 0 < flipped.sum() < flipped.size                # some voxels flipped, not all
    box = dt.window(SPACING, [c], hu.shape)
    outside = np.ones(hu.shape, bool)
    outside[box] = False
    assert not flipped[outside].any()                      # only what the tampers read


def test_unknown_method_is_a_usage_error():
    from utils.errors import UsageError

    with pytest.raises(UsageError, match="method"):
        C.CeilingSettings(method="adam").validate()


@pytest.mark.parametrize("method", ["pgd", "vertex"])
def test_init_continues_from_a_saved_perturbation(dt, hu, method):
    rng = np.random.default_rng(0)
    d0 = rng.choice(np.array([-6, 6], np.int8), size=hu.shape)
    if method == "pgd":
        d0[::3] = 2                                         # pgd keeps values inside the ball
    opt = C.CeilingOptimiser(dt, hu, SPACING, "a.mhd", _settings(eps=6, method=method), init=d0)
    np.testing.assert_array_equal(opt.perturbation(), d0)
    opt.step(0)
    d1 = opt.perturbation()
    box = dt.window(SPACING, opt.seen, hu.shape)
    outside = np.ones(hu.shape, bool)
    outside[box] = False
    np.testing.assert_array_equal(d1[outside], d0[outside])   # only the step's window moved
    assert not np.array_equal(d1, d0)


def test_cli_init_continues_and_refuses_its_own_output(tmp_path, tiny_ctgan_models, hu):
    from procedures.benchmarking.benchmark import write_scan

    data = tmp_path / "scans"
    data.mkdir()
    write_scan(hu, SPACING, data / "lung9.mhd")
    first, second = tmp_path / "first", tmp_path / "second"
    base = ["--data", str(data), "--models", str(tiny_ctgan_models), "--steps", "1",
            "--curve-locations", "1", "--no-progress", "--method", "vertex"]
    assert run_cli(C.main, base + ["--out", str(first)]) == 0
    assert run_cli(C.main, base + ["--out", str(first), "--init", str(first)]) == 2
    assert run_cli(C.main, base + ["--out", str(second), "--init", str(tmp_path)]) != 0  # no d
    assert run_cli(C.main, base + ["--out", str(second), "--init", str(first),
                                   "--seed", "1"]) == 0
    report = json.loads((second / "lung9.json").read_text())
    assert report["init"] == str(first)
    flipped = np.load(second / "lung9.npy") != np.load(first / "lung9.npy")
    assert 0 < flipped.mean() < 0.5                 # continued from the first d, not new signs


def test_curve_plot_chains_continued_runs(tmp_path):
    from procedures.protection import ceiling_plot as P

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    nan = float("nan")
    (a / "lung1.json").write_text(json.dumps(
        {"scan": "lung1.mhd", "step": [0, 5, 10], "heldout_hu": [1, 2, 3],
         "train_hu": [nan, 2, 3], "init": None}))
    (b / "lung1.json").write_text(json.dumps(
        {"scan": "lung1.mhd", "step": [0, 4], "heldout_hu": [3, 4], "train_hu": [nan, 4],
         "init": str(a)}))
    runs = P.read_runs([b, a])
    assert [r["offset"] for r in runs["lung1.mhd"]] == [0, 10]
    png = tmp_path / "curve.png"
    assert run_cli(P.main, [str(a), str(b), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_cli(P.main, [str(tmp_path), "--out", str(png)]) != 0       # no run there
