"""CT-GAN training set (procedures.ctgan.dataset) and trainer (procedures.ctgan.train), docs/ctgan-training.md."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from procedures.ctgan import dataset as ds
from procedures.ctgan.train import (PRESETS, epoch_batches, make_condition, make_config, main,
                                    save_schedule, train)
from conftest import make_phantom
from utils.errors import CoordinateError, InputFileError, UsageError, run_cli
from utils.scan_io import Scan, save_mhd


# --- augmentation ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cube40():
    rng = np.random.default_rng(0)
    return rng.normal(-600, 200, size=(40, 40, 40)).astype(np.float32)


@pytest.fixture(scope="module")
def aug(cube40):
    return ds.augment(cube40)


def test_augment_gives_67_variants_in_published_order(cube40, aug):
    assert ds.N_AUG == 67 and len(ds.ANGLES) == 59
    assert aug.shape == (67, 40, 40, 40) and aug.dtype == np.float32
    np.testing.assert_array_equal(aug[0], cube40)
    np.testing.assert_array_equal(aug[1], cube40[:, ::-1, :])
    np.testing.assert_array_equal(aug[2], cube40[:, :, ::-1])
    np.testing.assert_array_equal(aug[3], cube40[:, ::-1, ::-1])
    # 66 distinct cubes: the 180-degree rotation is exactly the flip on both axes
    flat = aug.reshape(67, -1)
    assert len({f.tobytes() for f in flat}) == 66
    np.testing.assert_array_equal(aug[8 + ds.ANGLES.index(180)], aug[3])


def test_shift_moves_content_by_4_voxels(cube40, aug):
    # shifts (0,+4,+4), (0,-4,+4), (0,+4,-4), (0,-4,-4): exact copies away from the filled border
    np.testing.assert_allclose(aug[4][:, 4:, 4:], cube40[:, :-4, :-4], atol=1e-2)
    np.testing.assert_allclose(aug[5][:, :-4, 4:], cube40[:, 4:, :-4], atol=1e-2)
    np.testing.assert_allclose(aug[6][:, 4:, :-4], cube40[:, :-4, 4:], atol=1e-2)
    np.testing.assert_allclose(aug[7][:, :-4, :-4], cube40[:, 4:, 4:], atol=1e-2)
    # the filled border is exactly what the 32^3 centre crop removes
    assert np.all(aug[4][:, :4, :] == 0)
    crop = ds.centre_crop(aug[4:5])[0]
    np.testing.assert_allclose(crop, cube40[4:36, 0:32, 0:32], atol=1e-2)


def test_rotations_are_in_the_yx_plane(cube40, aug):
    rot = {a: aug[8 + i] for i, a in enumerate(ds.ANGLES)}
    assert sorted(rot) == list(range(6, 360, 6))
    # 90 and 180 degrees are exact grid permutations; 180 equals the flip on both axes
    np.testing.assert_allclose(rot[90], np.rot90(cube40, 1, axes=(1, 2)), atol=1e-2)
    np.testing.assert_allclose(rot[180], aug[3], atol=1e-2)
    np.testing.assert_allclose(rot[270], np.rot90(cube40, -1, axes=(1, 2)), atol=1e-2)
    # z is never mixed: each axial slice rotates on its own
    single = np.zeros_like(cube40)
    single[10] = cube40[10]
    r = ds.augment(single)
    assert np.abs(r[8:, :10]).max() < 1e-3 and np.abs(r[8:, 11:]).max() < 1e-3


def test_rotation_of_a_radially_symmetric_cube_is_unchanged():
    z, y, x = np.indices((40, 40, 40), dtype=np.float32)
    blob = 1000.0 * np.exp(-((y - 19.5) ** 2 + (x - 19.5) ** 2) / (2 * 6.0 ** 2)) * (1 + z / 40)
    out = ds.augment(blob - 1000)
    disc = (y - 19.5) ** 2 + (x - 19.5) ** 2 < 18 ** 2  # inside: no reflected padding enters
    for k in range(8, 67):  # every rotation
        np.testing.assert_allclose(out[k][disc], blob[disc] - 1000, atol=2.0)
    # ...whereas a shift visibly moves the blob's peak by 4 voxels in y and x
    peak = np.unravel_index(np.argmax(out[4][20]), (40, 40))
    assert peak in {(23, 23), (23, 24), (24, 23), (24, 24)}


def test_centre_crop_takes_the_middle_32():
    c = np.arange(2 * 40 ** 3, dtype=np.float32).reshape(2, 40, 40, 40)
    np.testing.assert_array_equal(ds.centre_crop(c), c[:, 4:36, 4:36, 4:36])
    small = np.zeros((1, 30, 40, 40), np.float32)  # published 5 mm zoom: 30 slices
    out = ds.centre_crop(small)
    assert out.shape == (1, 32, 32, 32) and (out[0, 0] == -1000).all() and (out[0, 1:31] == 0).all()


def test_extract_cube_resamples_to_40mm():
    vol = make_phantom((40, 128, 128)).astype(np.float32)
    # 3 mm slices: round(40/3) = 13 slices; the published zoom gives 39 mm, ours exactly 40
    pub = ds.extract_cube(vol, (3.0, 0.5, 0.5), (20, 64, 64), exact_resample=False)
    ours = ds.extract_cube(vol, (3.0, 0.5, 0.5), (20, 64, 64))
    assert pub.shape == (39, 40, 40) and ours.shape == (40, 40, 40)
    assert ours.dtype == np.float32
    # a location near the edge is padded with -1000 HU (air)
    edge = ds.extract_cube(vol, (1.0, 1.0, 1.0), (0, 0, 0))
    assert edge.shape == (40, 40, 40) and edge[:15, :15, :15].max() < -990


# --- whole training set from a CSV ------------------------------------------------------------
@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("scans")
    hu = make_phantom((40, 64, 64))
    scan = Scan(hu=hu, spacing=(2.5, 0.7, 0.7), origin=(-50.0, 10.0, -20.0))
    save_mhd(scan, d / "ph.mhd")
    centre = (20, 32, 46)  # the phantom's nodule
    world = scan.vox2world(centre)
    (d / "loc.csv").write_text(
        "filename,z,y,x,coord\n"
        f"ph.mhd,{centre[0]},{centre[1]},{centre[2]},vox\n"
        f"ph.mhd,{world[0]},{world[1]},{world[2]},world\n")
    return d


def test_build_training_set_shapes_and_normalisation(scan_dir):
    t = ds.build_training_set(scan_dir / "loc.csv", progress=False)
    x = t.samples
    assert x.shape == (134, 32, 32, 32, 1) and x.dtype == np.float32
    # the world row names the same voxel as the vox row
    np.testing.assert_allclose(x[:67], x[67:], atol=1e-6)
    mean, vmin, vmax = t.normalization
    assert vmin < mean < vmax and vmax == pytest.approx(32 ** 3)
    # (v - mean) / (max - min): spans exactly 1, mean 0, about [-0.5, 0.5]
    assert x.max() - x.min() == pytest.approx(1.0, abs=1e-5)
    assert abs(float(x.astype(np.float64).mean())) < 1e-5
    assert -0.75 < x.min() < -0.25 and 0.25 < x.max() < 0.75
    # undoing normalisation and equalisation returns the HU samples
    from utils.scan_io import load_scan
    s = load_scan(scan_dir / "ph.mhd")
    hu = ds.location_samples(s.hu, s.spacing, (20, 32, 46))
    back = t.equalizer.dequalize(ds.denormalize(x[:67, ..., 0].astype(np.float64), t.normalization))
    assert np.median(np.abs(back - hu)) < 1.0
    # the nodule is bright in the middle of the original sample
    assert hu[0, 14:18, 14:18, 14:18].mean() > -200 > hu[0, 16, 16, 2:6].mean()


def test_save_preprocessing_writes_npz_and_npy(tmp_path, scan_dir):
    t = ds.build_training_set(scan_dir / "loc.csv", progress=False)
    ds.save_preprocessing(tmp_path, t.equalizer, t.normalization)
    from utils.equalizer import HistEqualizer
    np.testing.assert_array_equal(HistEqualizer.load(tmp_path / "equalization.npz").cdf, t.equalizer.cdf)
    np.testing.assert_array_equal(np.load(tmp_path / "normalization.npy"), t.normalization)


def test_csv_errors(tmp_path, scan_dir):
    with pytest.raises(InputFileError, match="not found"):
        ds.read_locations(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("filename,z,y\nph.mhd,1,2\n")
    with pytest.raises(InputFileError, match="missing column"):
        ds.read_locations(bad)
    out = scan_dir / "outside.csv"
    out.write_text("filename,z,y,x\nph.mhd,20,32,400\n")
    with pytest.raises(CoordinateError, match="outside"):
        ds.build_training_set(out, progress=False)
    coord = scan_dir / "coord.csv"
    coord.write_text("filename,z,y,x,coord\nph.mhd,20,32,40,mm\n")
    with pytest.raises(InputFileError, match="vox"):  # a malformed file, like a bad number
        ds.read_locations(coord)


# --- trainer ----------------------------------------------------------------------------------
def test_condition_zeroes_only_the_mask():
    x = np.ones((2, 32, 32, 32, 1), np.float32)
    c = make_condition(x)
    assert c[:, 6:26, 6:26, 6:26].max() == 0 and c.sum() == 2 * (32 ** 3 - 20 ** 3)
    assert x.min() == 1  # input untouched


def test_presets_and_config():
    assert PRESETS["paper"]["gf"] == PRESETS["paper"]["df"] == 100
    paper = make_config("paper")
    assert (paper.epochs, paper.batch, paper.g_lr, paper.d_lr, paper.beta1, paper.l1_weight) == \
        (200, 32, 2e-4, 1e-6, 0.5, 100.0)
    demo = make_config("demo", epochs=2, gf=None)
    assert demo.epochs == 2 and demo.gf == PRESETS["demo"]["gf"]
    with pytest.raises(UsageError):
        make_config("nope")
    with pytest.raises(UsageError):
        make_config("demo", gf=0)
    with pytest.raises(UsageError):
        make_config("demo", model="xyz")


def test_cli_rejects_unknown_flags_and_missing_csv(tmp_path, capsys):
    assert run_cli(main, ["--model", "inj", "--csv", "a.csv", "--out", str(tmp_path), "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert run_cli(main, ["--model", "xx", "--csv", "a.csv", "--out", str(tmp_path)]) == 2
    assert run_cli(main, ["--model", "inj", "--csv", str(tmp_path / "none.csv"), "--out",
                          str(tmp_path / "m"), "--backend", _backend()]) == 3
    assert not (tmp_path / "m").exists()
    assert main(["--help"]) == 0


def _backend() -> str:
    """The Keras backend this test process uses (one per process)."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    from procedures.attacker.keras_env import default_backend
    return default_backend()


def _g_weights(path):
    import h5py
    out = {}
    with h5py.File(path, "r") as f:
        f["model_weights"].visititems(
            lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_save_schedule_published_quirk():
    assert save_schedule(3, published=False) == [(0, "end"), (1, "end"), (2, "end")]
    # published: start of epochs 2..N, so the last epoch's weights are never saved
    assert save_schedule(3, published=True) == [(1, "start"), (2, "start")]
    assert save_schedule(1, published=True) == []


def test_published_batching_shuffles_once_and_drops_a_batch():
    rng = np.random.default_rng(0)
    once = rng.permutation(20)
    pub = [epoch_batches(20, 4, 5, rng, True, once) for _ in range(2)]
    assert len(pub[0]) == 4 == 20 // 4 - 1                      # n_batches - 1 per epoch
    assert all(np.array_equal(a, b) for a, b in zip(*pub))      # the same order every epoch
    np.testing.assert_array_equal(np.concatenate(pub[0]), once[:16])
    ours = [epoch_batches(20, 4, 5, rng, False) for _ in range(2)]
    assert len(ours[0]) == 5 and sorted(np.concatenate(ours[0])) == list(range(20))
    assert not all(np.array_equal(a, b) for a, b in zip(*ours))  # reshuffled each epoch


def test_reference_preset_is_the_published_trainer():
    ref = make_config("reference")
    assert (ref.published_batching, ref.integer_hu, ref.frozen_d_batch_stats, ref.exact_resample,
            ref.published_save_schedule) == (True, True, True, False, True)
    paper = make_config("paper")
    assert (paper.published_batching, paper.integer_hu, paper.frozen_d_batch_stats) == (False, False, True)


@pytest.mark.tf
def test_frozen_discriminator_in_the_combined_model_uses_batch_statistics():
    """Keras 2 (the published trainer) normalised a frozen D with each batch's statistics in
    training; Keras 3 alone would use the moving averages."""
    from procedures.ctgan.train import build_models
    from procedures.attacker.keras_env import get_keras

    keras = get_keras(_backend())
    rng = np.random.default_rng(0)
    a = rng.uniform(-0.5, 0.5, (4, 32, 32, 32, 1)).astype(np.float32)
    b = make_condition(a)
    for published in (True, False):
        G, D, combined = build_models(keras, make_config("demo", gf=2, df=2, frozen_d_batch_stats=published))
        moving = [np.asarray(w).copy() for w in D.non_trainable_weights]
        valid, fake = (np.asarray(t) for t in combined([a, b], training=True))
        for w, m in zip(D.non_trainable_weights, moving, strict=True):   # nothing updated
            np.testing.assert_array_equal(np.asarray(w), m)
        # inference still uses the moving averages
        v_inf, f_inf = (np.asarray(t) for t in combined([a, b], training=False))
        np.testing.assert_allclose(v_inf, np.asarray(D([f_inf, b], training=False)), atol=1e-5)
        d_moving = np.asarray(D([fake, b], training=False))
        D.trainable = True
        d_batch = np.asarray(D([fake, b], training=True))   # batch statistics (and an update)
        D.trainable = False
        if published:
            np.testing.assert_allclose(valid, d_batch, atol=1e-5)
            assert np.abs(valid - d_moving).max() > 0.1
        else:
            np.testing.assert_allclose(valid, d_moving, atol=1e-5)
        assert {w.path for w in combined.trainable_weights} == {w.path for w in G.trainable_weights}


@pytest.mark.tf
def test_tiny_training_via_cli_writes_the_model_folder_and_is_reproducible(tmp_path, scan_dir, capsys):
    """One eager step of gf=df=2 (TensorFlow's graph tracing alone would take ~30 s here)."""
    from procedures.attacker.keras_env import get_keras
    keras = get_keras(_backend())
    out = tmp_path / "REM"
    args = dict(epochs=1, gf=2, df=2, batch=4, max_steps_per_epoch=1, seed=3)
    rc = main(["--model", "rem", "--csv", str(scan_dir / "loc.csv"), "--out", str(out), "--preset", "demo",
               "--backend", _backend(), "--eager", "--quiet"]
              + [f"--{k.replace('_', '-')}={v}" for k, v in args.items()])
    assert rc == 0
    assert "trained rem" in capsys.readouterr().out
    for name in ("G_model.h5", "equalization.npz", "normalization.npy", "config.json", "history.json",
                 "progress/epoch_001.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp*"))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model"], cfg["n_samples"], cfg["steps_per_epoch"], cfg["preset"], cfg["gf"]) == \
        ("rem", 134, 1, "demo", 2)
    h = json.loads((out / "history.json").read_text())[0]
    assert np.isfinite([h["d_loss"], h["g_loss"], h["g_l1"], h["g_adv"]]).all()
    assert h["g_loss"] == pytest.approx(h["g_adv"] + 100 * h["g_l1"], rel=1e-4)  # MSE + 100 x L1
    # Keras 3 reloads the generator without compiling and predicts a cube
    data = ds.build_training_set(scan_dir / "loc.csv", progress=False)
    np.testing.assert_array_equal(np.load(out / "normalization.npy"), data.normalization)
    G = keras.models.load_model(out / "G_model.h5", compile=False)
    y = np.asarray(G.predict(make_condition(data.samples[:2]), verbose=0))
    assert y.shape == (2, 32, 32, 32, 1) and np.abs(y).max() <= 1.0
    # the same seed through the API gives bit-identical generator weights
    cfg2 = make_config("demo", model="rem", backend=_backend(), run_eagerly=True, **args)
    res = train(data, tmp_path / "again", cfg2, progress=False)
    assert res.saved_epochs == 1
    w1, w2 = _g_weights(out / "G_model.h5"), _g_weights(tmp_path / "again" / "G_model.h5")
    assert w1.keys() == w2.keys() and len(w1) > 10
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k], err_msg=k)
    # ...and that step did train: the kernels moved away from the seeded initialisation
    from procedures.ctgan.models import build_generator
    keras.utils.set_random_seed(3)
    g0 = {w.path: np.asarray(w) for w in build_generator(keras, 2).weights}
    trained = {w.path: np.asarray(w) for w in G.weights}
    assert g0.keys() == trained.keys()
    assert not np.array_equal(g0["g_d1_conv/kernel"], trained["g_d1_conv/kernel"])
    np.testing.assert_allclose(g0["g_d1_conv/kernel"], trained["g_d1_conv/kernel"], atol=1e-2)


@pytest.mark.tf
def test_the_attacker_loads_a_published_keras2_generator(tmp_path, tiny_ctgan_models):
    """A G_model.h5 written by Keras 2 (tf_keras, the published CT-GAN's format) in a model
    folder: our attacker's loader (procedures.attacker.pipeline.CTGANModel) computes its cube."""
    import shutil

    from procedures.attacker.pipeline import CTGANModel

    tf_keras = pytest.importorskip("tf_keras")
    L = tf_keras.layers
    gf = 2

    def down(x, f, bn=True):
        x = L.Conv3D(f, 4, strides=2, padding="same")(x)
        x = L.LeakyReLU(alpha=0.2)(x)
        return L.BatchNormalization(momentum=0.8)(x) if bn else x

    def up(x, skip, f):
        x = L.UpSampling3D(size=2)(x)
        x = L.Conv3D(f, 4, strides=1, padding="same", activation="relu")(x)
        x = L.Dropout(0.5)(x)
        x = L.BatchNormalization(momentum=0.8)(x)
        x = L.Cropping3D(cropping=((0, 0), (0, 0), (0, 0)))(x)  # published get_crop_shape: no-op
        return L.Concatenate()([x, skip])

    d0 = L.Input(shape=(32, 32, 32, 1), name="input_image")
    d1 = down(d0, gf, bn=False)
    d2 = down(d1, gf * 2)
    d3 = down(d2, gf * 4)
    d4 = down(d3, gf * 8)
    d5 = down(d4, gf * 8)
    u = up(up(up(up(d5, d4, gf * 8), d3, gf * 4), d2, gf * 2), d1, gf)
    out = L.Conv3D(1, 4, strides=1, padding="same", activation="tanh")(L.UpSampling3D(size=2)(u))
    g2 = tf_keras.Model(d0, out)
    # non-trivial BatchNorm statistics, as a trained file would have
    rng = np.random.default_rng(0)
    for layer in g2.layers:
        if isinstance(layer, L.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([g * 1.3, b + 0.1, m + rng.normal(0, 0.1, m.shape), v * 2.0])
    folder = tmp_path / "INJ"
    shutil.copytree(tiny_ctgan_models / "INJ", folder)
    g2.save(folder / "G_model.h5")

    cube = rng.uniform(-0.5, 0.5, size=(1, 32, 32, 32, 1)).astype(np.float32)
    ref = g2.predict(cube, verbose=0)
    got = CTGANModel(folder, backend=_backend()).generate(cube)
    assert got.shape == ref.shape == (1, 32, 32, 32, 1)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_deterministic_kernels_hold_during_training_only():
    """A seeded CT-GAN training asks for deterministic kernels and gives the setting back, also
    when the training fails (the rest of the process, e.g. an evaluation, keeps its own)."""
    import torch

    from procedures.ctgan.train import deterministic_kernels

    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels("torch"):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
    with pytest.raises(RuntimeError, match="boom"):
        with deterministic_kernels("torch"):
            raise RuntimeError("boom")
    assert torch.are_deterministic_algorithms_enabled() == before


@pytest.mark.tf
def test_deterministic_kernels_on_tensorflow_are_given_back():
    pytest.importorskip("tensorflow")
    from tensorflow.python.framework import config as tf_config

    from procedures.ctgan.train import deterministic_kernels

    before = tf_config.is_op_determinism_enabled()
    with deterministic_kernels("tensorflow"):
        assert tf_config.is_op_determinism_enabled()
    assert tf_config.is_op_determinism_enabled() == before
