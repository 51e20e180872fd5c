"""CT-GAN's scan manipulator (procedures/attacker/pipeline.py) with tiny random generators."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import build_tiny_ctgan_models as make_tiny_ctgan
from conftest import make_phantom
from test_equalizer import _reference_dir
from procedures.attacker.pipeline import (AttackBorderError, AttackShapeError, CTGANModel, ScanManipulator,
                                        check_coord, copy_noise, fix_overflow, kern01, published_shape_error)
from utils.cubes import cut_cube
from utils.errors import CoordinateError, ModelFileError, UnsafeFileError
from utils.scan_io import Scan



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_tiny_ctgan(tmp_path_factory.mktemp("ctgan"))


@pytest.fixture(scope="module")
def man(models):
    m = ScanManipulator(models)
    m.injector, m.remover  # loaded once; later manipulators on `models` share them (CTGANModel.shared)
    return m


def big_phantom(shape=(60, 96, 96), seed=1):
    return make_phantom(shape, seed=seed).astype(np.float32)


# --------------------------------------------------------------------------------------------
# pure helpers (no TensorFlow)
# --------------------------------------------------------------------------------------------
def test_fix_overflow_hand_example():
    cube = np.zeros((7, 7, 7))
    cube[3, 3, 3] = 5000.0      # inside: mean of 124 zeros and itself
    cube[0, 0, 0] = 5000.0      # corner: 27 voxels inside the cube, 98 of padding at -1000
    cube[6, 6, 0] = -1500.0     # underflow
    out = fix_overflow(cube)
    assert out[3, 3, 3] == pytest.approx(5000.0 / 125)
    assert out[0, 0, 0] == pytest.approx((5000.0 - 98 * 1000.0) / 125)  # -744
    assert out[6, 6, 0] == -1000.0
    rest = np.ones(cube.shape, bool)
    rest[3, 3, 3] = rest[0, 0, 0] = rest[6, 6, 0] = False
    assert np.all(out[rest] == 0) and cube[3, 3, 3] == 5000.0  # input untouched


def test_fix_overflow_matches_published_loop_for_isolated_voxels():
    rng = np.random.default_rng(0)
    cube = rng.uniform(-1200, 1500, (12, 12, 12))
    for p in [(0, 0, 0), (5, 5, 5), (11, 3, 9), (2, 10, 6)]:  # > 2 voxels apart
        cube[p] = rng.uniform(2100, 6000)
    expected = cube.copy()
    for p in zip(*np.where(cube > 2000)):  # the published loop, one voxel at a time
        expected[p] = np.mean(cut_cube(expected, np.array(p), (5, 5, 5), -1000))
    expected[expected < -1000] = -1000
    np.testing.assert_allclose(fix_overflow(cube), expected, rtol=0, atol=1e-9)


def test_kern01_is_a_01_gaussian():
    for n, s in [(72, 3.0), (41, 0.1), (59, 3.0)]:
        k = kern01(n, s)
        assert k.shape == (n, n) and k.min() == 0 and k.max() == 1
        np.testing.assert_allclose(k, k.T)
    assert kern01(41, 0.1).mean() > kern01(41, 3.0).mean()  # removal blends almost everywhere


@pytest.mark.parametrize("s, ok", [(5.0, False), (2.5, True), (1.8, True), (1.25, True), (1.0, True)])
def test_published_zoom_reaches_32_except_5mm(s, ok):
    msg = published_shape_error((s, 0.7, 0.7))
    assert (msg is None) == ok
    if not ok:
        assert "round(round(32/5.0)*5.0)=30 != 32" in msg and "data/z2.5" in msg


def test_copy_noise_is_zero_mean_and_deterministic():
    vol = big_phantom()
    n1, n2 = copy_noise(vol, (41, 41, 41)), copy_noise(vol, (41, 41, 41))
    assert n1.shape == (41, 41, 41) and abs(n1.mean()) < 1e-9
    np.testing.assert_array_equal(n1, n2)
    assert not np.any(copy_noise(np.zeros((10, 20, 20), np.float32), (5, 5, 5)))  # no lung: no noise


def test_coordinates_outside_the_scan():
    with pytest.raises(CoordinateError, match=r"outside the scan of shape \(z,y,x\)=\(60, 96, 96\)"):
        check_coord((60, 10, 10), (60, 96, 96))
    with pytest.raises(CoordinateError, match="outside"):
        check_coord((-0.5, 10, 10), (60, 96, 96))
    with pytest.raises(CoordinateError):
        check_coord((1, 2), (60, 96, 96))
    np.testing.assert_array_equal(check_coord((3.9, 0, 95.2), (60, 96, 96)), [3, 0, 95])


def test_missing_model_folder_is_an_error(tmp_path):
    with pytest.raises(ModelFileError, match="model folder not found"):
        CTGANModel(tmp_path / "nope")
    (tmp_path / "INJ").mkdir()
    with pytest.raises(ModelFileError, match="no generator file"):
        CTGANModel(tmp_path / "INJ")
    m = ScanManipulator(tmp_path)
    vol = big_phantom()
    with pytest.raises(ModelFileError):
        m.tamper_volume(vol, (1.25, 1.0, 1.0), (30, 48, 60), "remove")


def test_published_preset_leaves_scan_unchanged_without_model(tmp_path, capsys):
    vol = big_phantom()
    before = vol.copy()
    sl = ScanManipulator(tmp_path, missing_model="unchanged").tamper_volume(vol, (2.5, 0.7, 0.7), (30, 48, 60), "inject")
    np.testing.assert_array_equal(vol, before)
    assert vol[sl].size == 0 and "unchanged" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# with tiny Keras generators
# --------------------------------------------------------------------------------------------
@pytest.mark.tf
@pytest.mark.parametrize("action", ["inject", "remove"])
def test_tamper_changes_only_the_reference_cube_footprint(man, action):
    vol = big_phantom()
    before = vol.copy()
    spacing, coord = (1.25, 1.0, 1.0), (30, 48, 60)   # cube (26, 32, 32), reference side 41
    sl = man.tamper_volume(vol, spacing, coord, action)
    assert sl == man.footprint(vol.shape, spacing, coord) == (slice(10, 51), slice(28, 69), slice(40, 81))
    changed = vol != before
    inside = np.zeros(vol.shape, bool)
    inside[sl] = True
    assert changed[inside].sum() > 0.2 * inside.sum()
    assert not changed[~inside].any()
    assert np.isfinite(vol).all()


@pytest.mark.tf
def test_remove_keeps_values_in_range(man):
    vol = big_phantom()
    before = vol.copy()
    sl = man.tamper_volume(vol, (1.25, 1.0, 1.0), (30, 48, 66), "remove")
    # final = mal * k + ben * (1 - k) (the published +m / -m cancel): a blend of the benign block
    # and the generator cube (clipped to [-1000, 2000] HU) plus copied noise of +-~150 HU.
    assert np.isfinite(vol[sl]).all()
    assert vol[sl].min() >= min(before.min(), -1000) - 200
    assert vol[sl].max() <= 2000 + 200


@pytest.mark.tf
def test_fixed_seed_is_reproducible(man, models):
    def run(seed, noise):
        vol = big_phantom()
        ScanManipulator(models, noise=noise, seed=seed).tamper_volume(vol, (1.25, 1.0, 1.0), (30, 48, 60), "inject")
        return vol

    np.testing.assert_array_equal(run(3, "gaussian"), run(3, "gaussian"))
    assert not np.array_equal(run(3, "gaussian"), run(4, "gaussian"))
    np.testing.assert_array_equal(run(None, "copy"), run(None, "copy"))  # copy noise: deterministic


@pytest.mark.tf
def test_5mm_slices_exact_resampling_vs_published(man, models):
    vol = big_phantom((20, 96, 96))
    before = vol.copy()
    sl = ScanManipulator(models).tamper_volume(vol, (5.0, 1.0, 1.0), (10, 48, 60), "inject")
    assert (vol != before)[sl].any()
    pub = ScanManipulator(models, exact_resample=False)
    with pytest.raises(AttackShapeError, match=r"round\(round\(32/5.0\)\*5.0\)=30 != 32"):
        pub.tamper_volume(before.copy(), (5.0, 1.0, 1.0), (10, 48, 60), "inject")
    vol25 = big_phantom((40, 96, 96))
    ref = vol25.copy()
    pub.tamper_volume(vol25, (2.5, 1.0, 1.0), (20, 48, 60), "inject")
    assert (vol25 != ref).any()


@pytest.mark.tf
def test_published_preset_fails_where_the_reference_cube_leaves_the_scan(man, models):
    vol = big_phantom()
    with pytest.raises(AttackBorderError, match="leaves the scan"):
        ScanManipulator(models, published=True).tamper_volume(vol, (1.25, 1.0, 1.0), (5, 48, 60), "inject")
    np.testing.assert_array_equal(vol, big_phantom())   # failed before touching the volume
    vol2 = vol.copy()
    ScanManipulator(models).tamper_volume(vol2, (1.25, 1.0, 1.0), (5, 48, 60), "inject")  # default pads
    assert (vol2 != vol).any()


@pytest.mark.tf
def test_world_coordinates(man, models):
    hu = big_phantom()
    scan = Scan(hu=hu, spacing=(1.25, 1.0, 1.0), origin=(-100.0, 20.0, -40.0))
    vox = np.array([30, 48, 60])
    a = ScanManipulator(models)
    a.set_scan(scan)
    sa = a.tamper(vox, "inject", isVox=True)
    by_vox = a.scan.hu
    a.set_scan(scan)
    sb = a.tamper(scan.vox2world(vox + 0.25), "inject", isVox=False)
    assert sa == sb
    np.testing.assert_array_equal(a.scan.hu, by_vox)
    np.testing.assert_array_equal(scan.hu, hu)           # the caller's scan is not modified
    assert (by_vox != hu).any()
    with pytest.raises(CoordinateError, match="outside the scan"):
        a.tamper(scan.vox2world((30, 48, 200)), isVox=False)


@pytest.mark.tf
def test_legacy_pickle_equaliser_and_readme_file_name(models, tmp_path):
    d = tmp_path / "INJ"
    d.mkdir()
    shutil.copy(models / "INJ" / "G_model.h5", d / "G_model_inj.h5")   # README's name
    for f in ("equalization.pkl", "normalization.npy"):
        shutil.copy(_reference_dir() / "INJ" / f, d / f)
    m = CTGANModel(d)
    assert m.eq.centres.shape == (10000,) and m.g_path.name == "G_model_inj.h5"
    np.testing.assert_allclose(m.norm, [16410.8, 3.5e-4, 32768], rtol=2e-2)
    vol = big_phantom()
    before = vol.copy()
    ScanManipulator(tmp_path).tamper_volume(vol, (1.25, 1.0, 1.0), (30, 48, 60), "inject")
    assert np.isfinite(vol).all() and (vol != before).any()


@pytest.mark.tf
def test_model_that_runs_code_is_refused(models, tmp_path):
    from procedures.attacker.keras_env import get_keras

    keras = get_keras()
    i = keras.Input((32, 32, 32, 1))
    d = tmp_path / "INJ"
    d.mkdir()
    keras.Model(i, keras.layers.Lambda(lambda t: t * 2.0)(i)).save(d / "G_model.h5")
    for f in ("equalization.npz", "normalization.npy"):
        shutil.copy(models / "INJ" / f, d / f)
    with pytest.raises(UnsafeFileError, match="G_model.h5"):
        CTGANModel(d)


@pytest.mark.tf
@pytest.mark.realdata
def test_real_scan_inject_at_its_nodule(man, models, real_data_dir):
    import pandas as pd
    from utils.scan_io import load_scan

    scan = load_scan(real_data_dir / "lung1.mhd")
    nod = pd.read_csv(real_data_dir / "nodules.csv")
    row = nod[nod.filename == "lung1.mhd"].iloc[0]
    coord = (int(row.z), int(row.y), int(row.x))
    m = ScanManipulator(models)
    m.set_scan(scan)
    before = m.scan.hu.copy()
    sl = m.tamper(coord, "inject")
    assert sl == m.footprint(scan.shape, scan.spacing, coord)
    changed = m.scan.hu != before
    outside = np.ones(changed.shape, bool)
    outside[sl] = False
    assert changed[sl].any() and not changed[outside].any()
    assert np.isfinite(m.scan.hu).all()
    with pytest.raises(AttackShapeError, match="5.0 mm"):   # 5 mm: the published zoom cannot
        ScanManipulator(models, exact_resample=False).tamper_volume(before.copy(), scan.spacing, coord, "inject")
