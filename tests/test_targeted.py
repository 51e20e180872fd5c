"""procedures.protection.targeted and protect.py --targets: targeted protection of known findings on tiny
phantoms with a tiny CT-GAN (random gf-2 generators)."""
import numpy as np
import pytest
import torch

import protect
from conftest import make_phantom
from helpers import assert_refused, call, tree
from procedures.protection import targeted as T
from utils.errors import CoordinateError, InputFileError, UsageError
from utils.scan_io import Scan, load_scan, save_mhd

SPACING = (2.5, 0.7, 0.7)


@pytest.fixture(scope="module")
def scan_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("targeted") / "chest.mhd"
    save_mhd(Scan(make_phantom((24, 48, 48), seed=3), SPACING, (-30.0, 10.0, -5.0)), p)
    return p


def _disruption(dt, real, protected, spacing, centres, action):
    """Mean RMSE(CT-GAN(protected), CT-GAN(real)) over cube centres, through the torch port."""
    with torch.no_grad():
        a = dt.footprints(torch.from_numpy(real).expand(len(centres), *real.shape), spacing, centres, action)
        b = dt.footprints(torch.from_numpy(protected).expand(len(centres), *real.shape), spacing, centres, action)
    return float(np.mean([(x[0] - y[0]).pow(2).mean().sqrt().item() for x, y in zip(a, b)]))


def test_rows_voxel_world_and_filename(tmp_path, scan_path):
    scan = load_scan(scan_path)
    world = scan.vox2world([12, 20, 30])
    p = tmp_path / "t.csv"
    p.write_text("filename,z,y,x,coord\n"
                 f"chest.mhd,10,20.7,31.2,vox\n"
                 f"chest.mhd,{world[0]},{world[1]},{world[2]},world\n"
                 "other.mhd,1,1,1,vox\n")
    rows = T.read_target_rows(p)
    assert T.targets_for_scan(rows, scan, "chest.mhd") == [(10, 20, 31), (12, 20, 30)]
    # Without a filename column every row applies; the coord column is optional (voxels).
    p.write_text("z,y,x\n5,6,7\n")
    assert T.targets_for_scan(T.read_target_rows(p), scan, "chest.mhd") == [(5, 6, 7)]


@pytest.mark.parametrize("text,error,words", [
    ("", InputFileError, "header with z,y,x"),
    ("z,y,x\n", InputFileError, "no targets"),
    ("a,b\n1,2\n", InputFileError, "header with z,y,x"),
    ("z,y,x\n1,two,3\n", InputFileError, "line 2"),
    ("z,y,x,coord\n1,2,3,mm\n", InputFileError, "vox or world"),
    ("z,y,x\n1,2,3\n100,2,3\n", CoordinateError, "outside the scan"),
    ("filename,z,y,x\nother.mhd,1,2,3\n", InputFileError, "no target for chest.mhd"),
])
def test_bad_targets_are_refused(tmp_path, scan_path, text, error, words):
    p = tmp_path / "t.csv"
    p.write_text(text)
    with pytest.raises(error, match=words):
        T.targets_for_scan(T.read_target_rows(p), load_scan(scan_path), "chest.mhd")


def test_offsets_and_reach_box():
    assert len(T.offset_grid(2)) == 125
    even, odd = T.offset_grid(2, 0), T.offset_grid(2, 1)
    assert len(even) + len(odd) == 125 and not set(map(tuple, even)) & set(map(tuple, odd))
    box = T.reach_box((13, 46, 46), (12, 24, 24), 2, (24, 48, 48))
    # Every cube centred within +-2 voxels lies inside the box (clipped to the volume).
    assert [(b.start, b.stop) for b in box] == [(4, 21), (0, 48), (0, 48)]  # z: 12 - 6 - 2 .. 12 + 7 + 2
    box = T.reach_box((5, 9, 9), (10, 20, 20), 2, (24, 48, 48))
    assert [(b.start, b.stop) for b in box] == [(6, 15), (14, 27), (14, 27)]  # round half to even


def test_optimised_perturbation_is_bounded_integer_and_local(scan_path, tiny_ctgan_models):
    scan = load_scan(scan_path)
    hu = scan.hu
    dt = T.load_attacker(tiny_ctgan_models)
    centre = (12, 24, 24)
    s = T.TargetSettings(eps=20, steps=4, offsets_per_step=1, parity=0, lr=0.3)
    prot, info = T.protect_targets(dt, hu, SPACING, [centre], s)
    d = prot - hu
    assert np.abs(d).max() <= 20 and np.array_equal(d, np.round(d))       # L-inf, integer HU
    box = tuple(slice(a, b) for a, b in info[0]["box"])
    outside = np.ones(hu.shape, bool)
    outside[box] = False
    assert not d[outside].any()                                              # nothing elsewhere
    # The optimisation climbs: at the offsets it trains on, four steps disrupt more than one.
    # (That one step runs on a generator's protection: it is kept outside the box.)
    other = hu.astype(np.float32) + 3
    one, _ = T.protect_targets(dt, hu, SPACING, [centre], T.TargetSettings(**{**vars(s), "steps": 1}), base=other)
    assert np.array_equal(one[outside], other[outside]) and np.abs(one[box] - hu[box]).max() <= 20
    centres = np.array([centre]) + T.offset_grid(2, 0)[::12]
    real = hu.astype(np.float32)
    gain = [_disruption(dt, real, prot, SPACING, centres, a) - _disruption(dt, real, one, SPACING, centres, a)
            for a in ("inject", "remove")]
    assert np.mean(gain) > 0, gain


def test_settings_are_validated():
    for bad in (dict(eps=0), dict(steps=0), dict(radius=-1), dict(actions=("swap",)), dict(method="sgd"),
                dict(background="noise")):
        with pytest.raises(UsageError):
            T.TargetSettings(**bad).validate()


def test_background_signs_are_seeded_and_bounded():
    hu = make_phantom((4, 16, 16), seed=1)
    s = T.TargetSettings(eps=7, seed=3)
    a, b = T.background(hu, s, "dir/a.mhd"), T.background(hu, s, "a.mhd")
    assert np.array_equal(a, b) and set(np.unique(a - hu)) == {-7.0, 7.0}    # by file name, +-eps
    assert not np.array_equal(a, T.background(hu, s, "b.mhd"))
    assert not np.array_equal(a, T.background(hu, T.TargetSettings(eps=7, seed=4), "a.mhd"))
    assert np.array_equal(T.background(hu, T.TargetSettings(background="none"), "a.mhd"), hu)


def test_protect_cli_with_targets_only(scan_path, tiny_ctgan_models, tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("filename,z,y,x,coord\nchest.mhd,12,24,24,vox\n")
    out = tmp_path / "out"
    rc = protect.main([str(scan_path), "--targets", str(csv), "--models", str(tiny_ctgan_models),
                       "--eps", "10", "--targeted-steps", "1", "-o", str(out), "--no-progress"])
    assert rc == 0
    assert "1 target(s), eps 10 HU" in capsys.readouterr().out
    got = load_scan(out / "chest_protected.mhd")
    src = load_scan(scan_path)
    d = got.hu.astype(np.int32) - src.hu
    assert got.hu.dtype == src.hu.dtype and 0 < np.abs(d).max() <= 10
    # Default background: +-eps signs outside the target's box (a corner no cube reaches).
    assert set(np.unique(d[:3, :3, :3])) == {-10, 10}
    rc = protect.main([str(scan_path), "--targets", str(csv), "--models", str(tiny_ctgan_models),
                       "--eps", "10", "--targeted-steps", "1", "-o", str(tmp_path / "bare"), "--no-progress",
                       "--background", "none"])
    bare = load_scan(tmp_path / "bare" / "chest_protected.mhd").hu.astype(np.int32) - src.hu
    assert rc == 0 and not bare[:3, :3, :3].any() and 0 < np.abs(bare).max() <= 10


def test_protect_cli_bad_background(scan_path, tmp_path, capfd):
    csv = tmp_path / "t.csv"
    csv.write_text("z,y,x\n12,24,24\n")
    before = tree(tmp_path)
    res = call(protect.main, [scan_path, "--targets", csv, "--background", "noise", "-o", tmp_path / "out"], capfd)
    assert_refused(res, UsageError.exit_code, ("--background", "noise"), tmp_path, before)


@pytest.mark.parametrize("text,code", [
    ("z,y,x\n12,24,99\n", CoordinateError.exit_code),      # outside the scan
    ("", InputFileError.exit_code),                        # empty
    ("z,y\n1,2\n", InputFileError.exit_code),              # malformed header
    ("z,y,x\n1,,3\n", InputFileError.exit_code),           # malformed row
])
def test_protect_cli_bad_targets_write_nothing(scan_path, tiny_ctgan_models, tmp_path, capfd, text, code):
    csv = tmp_path / "t.csv"
    csv.write_text(text)
    before = tree(tmp_path)
    res = call(protect.main, [scan_path, "--targets", csv, "--models", tiny_ctgan_models,
                              "-o", tmp_path / "out", "--no-progress"], capfd)
    assert_refused(res, code, ("t.csv", "target"), tmp_path, before)


def test_protect_cli_needs_a_checkpoint_or_targets(scan_path, tmp_path, capfd):
    before = tree(tmp_path)
    res = call(protect.main, [scan_path, "-o", tmp_path / "out"], capfd)
    assert_refused(res, UsageError.exit_code, ("-c", "--targets"), tmp_path, before)
