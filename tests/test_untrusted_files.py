"""Untrusted files never run code (docs/safety.md#untrusted-files-never-run-code).

Model files come from strangers. Each test crafts a file that WOULD write a marker file if it
were loaded the unsafe way (a positive control proves it), feeds it to our loaders and to the
entry points, and checks: the marker does not exist, the error is one line, and it is an
UnsafeFileError (exit 8) or, where the format simply cannot hold code for us (a pickled .npy
array read with allow_pickle=False), a ModelFileError/ScanFormatError.
Unit tests of the restricted unpickler are in test_equalizer.py; the Keras safe_mode unit test
(a harmless Lambda) is in test_attack.py.
"""
from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import evaluate  # noqa: E402
import GUI  # noqa: E402
import protect  # noqa: E402
import tamper  # noqa: E402
import train  # noqa: E402
from helpers import Ctx, assert_refused, call, phantom_scan, tree  # noqa: E402
from helpers import train_argv as _train  # noqa: E402
from utils.checkpoint import load_checkpoint, torch_load_weights  # noqa: E402
from utils.errors import ModelFileError, ScanFormatError, UnsafeFileError  # noqa: E402
from utils.scan_io import load_scan, save_mhd  # noqa: E402

UNSAFE = UnsafeFileError.exit_code


class Evil:
    """Unpickling calls os.system('touch <marker>'): arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _no_marker(marker: Path):
    assert not marker.exists(), "the file's code ran"


# ==============================================================================================
# the crafted files
# ==============================================================================================
def evil_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps([Evil(marker), np.linspace(0, 1, 5)]))
    return path


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A 'checkpoint' with the expected keys whose generator entry runs code when unpickled."""
    torch.save({"generator": Evil(marker), "config": {"preset": "demo"}, "step": 0}, path)
    return path


def evil_npy(path: Path, marker: Path) -> Path:
    np.save(path, np.array([Evil(marker)], dtype=object), allow_pickle=True)
    return path


def keras_lambda_model(path: Path, marker: Path, *, tf_keras: bool = False) -> Path:
    """A CT-GAN-shaped Keras model (input 32^3 x 1) whose Lambda layer touches `marker`.

    The lambda is compiled from source so that Keras serialises its bytecode with the path in it
    (no default arguments or closures, which Keras cannot restore)."""
    if tf_keras:
        import tf_keras as keras
    else:
        from procedures.attacker.keras_env import get_keras
        keras = get_keras()
    fn = eval(f"lambda t: (__import__('pathlib').Path({str(marker)!r}).touch(), t)[1]")  # noqa: S307
    i = keras.Input((32, 32, 32, 1))
    with warnings.catch_warnings():  # tf_keras: "HDF5 is a legacy format" (the point here)
        warnings.simplefilter("ignore", UserWarning)
        keras.Model(i, keras.layers.Lambda(fn)(i)).save(path)
    marker.unlink(missing_ok=True)  # building the model called the lambda once
    return path


def model_folder(root: Path, tiny_models: Path, *, eq: Path | None = None, g: Path | None = None) -> Path:
    """models/INJ and models/REM copied from the tiny CT-GAN, with INJ's equaliser or generator
    replaced by a crafted file."""
    for sub in ("INJ", "REM"):
        shutil.copytree(tiny_models / sub, root / sub)
    if eq is not None:
        (root / "INJ" / "equalization.npz").unlink()
        shutil.copy(eq, root / "INJ" / "equalization.pkl")
    if g is not None:
        shutil.copy(g, root / "INJ" / "G_model.h5")
    return root


# ==============================================================================================
# positive controls: each crafted file does run its code when loaded the unsafe way
# ==============================================================================================
def test_crafted_files_are_live(tmp_path):
    marker = tmp_path / "PWNED"
    pickle.loads(evil_pickle(tmp_path / "e.pkl", marker).read_bytes())  # noqa: S301
    assert marker.exists()
    marker.unlink()
    torch.load(evil_checkpoint(tmp_path / "e.pt", marker), weights_only=False)
    assert marker.exists()
    marker.unlink()
    np.load(evil_npy(tmp_path / "e.npy", marker), allow_pickle=True)
    assert marker.exists()


@pytest.mark.tf
def test_crafted_keras_models_are_live(tmp_path):
    from procedures.attacker.keras_env import get_keras

    keras = get_keras()
    marker = tmp_path / "PWNED"
    for name, tfk in (("k3.h5", False), ("k3.keras", False), ("k2.h5", True)):
        keras_lambda_model(tmp_path / name, marker, tf_keras=tfk)
        assert not marker.exists()
        keras.models.load_model(tmp_path / name, compile=False, safe_mode=False)
        assert marker.exists(), name
        marker.unlink()


# ==============================================================================================
# the loaders
# ==============================================================================================
def test_torch_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    p = evil_checkpoint(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(UnsafeFileError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "system" in msg and "weights_only=False" not in msg
    _no_marker(marker)
    # Any torch weights file (LPIPS weights too) goes through the same refusal.
    with pytest.raises(UnsafeFileError):
        torch_load_weights(p)
    _no_marker(marker)


def test_pickled_npy_is_refused(tmp_path):
    from procedures.attacker.model_dir import load_norm

    marker = tmp_path / "PWNED"
    with pytest.raises(ScanFormatError) as e:
        load_scan(evil_npy(tmp_path / "scan.npy", marker))
    assert "\n" not in str(e.value) and "scan.npy" in str(e.value)
    with pytest.raises(ModelFileError, match="normalization.npy"):
        load_norm(evil_npy(tmp_path / "normalization.npy", marker))
    _no_marker(marker)


@pytest.mark.tf
@pytest.mark.parametrize("name,tfk", [("G_model.h5", False), ("G_model.keras", False), ("G_model.h5", True)],
                         ids=["keras3-h5", "keras3-zip", "tf_keras-h5"])
def test_keras_lambda_refused_by_both_loaders(name, tfk, tiny_ctgan_models, tmp_path):
    """pipeline.CTGANModel (Keras, safe_mode) and h5_weights.from_keras_h5 (h5py or,
    for .keras, Keras in safe_mode) refuse a generator with a Lambda layer."""
    from procedures.attacker.h5_weights import from_keras_h5
    from procedures.attacker.pipeline import CTGANModel

    marker = tmp_path / "PWNED"
    g = keras_lambda_model(tmp_path / name, marker, tf_keras=tfk)
    with pytest.raises(UnsafeFileError) as e:
        from_keras_h5(g)
    assert "\n" not in str(e.value) and name in str(e.value)
    _no_marker(marker)
    if name.endswith(".h5"):
        folder = model_folder(tmp_path / "models", tiny_ctgan_models, g=g)
        with pytest.raises(UnsafeFileError) as e:
            CTGANModel(folder / "INJ")
        assert "\n" not in str(e.value) and "G_model.h5" in str(e.value)
    _no_marker(marker)


@pytest.mark.tf
def test_differentiable_tamper_refuses_a_pickle_equaliser(tiny_ctgan_models, tmp_path):
    from procedures.attacker.model_dir import load_attacker_pair

    marker = tmp_path / "PWNED"
    folder = model_folder(tmp_path / "models", tiny_ctgan_models, eq=evil_pickle(tmp_path / "e.pkl", marker))
    with pytest.raises(UnsafeFileError, match="equalization.pkl"):
        load_attacker_pair(folder)
    _no_marker(marker)


# ==============================================================================================
# the entry points
# ==============================================================================================
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from helpers import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("untrusted_ckpt"))


def _scan(tmp_path: Path) -> Path:
    p = tmp_path / "in" / "chest.mhd"
    p.parent.mkdir(exist_ok=True)
    save_mhd(phantom_scan(shape=(20, 48, 48)), p)
    return p


@pytest.mark.parametrize("entry", ["protect", "evaluate", "GUI", "train"])
def test_entry_points_refuse_a_checkpoint_that_runs_code(entry, tmp_path, capfd):
    marker = tmp_path / "PWNED"
    scan = _scan(tmp_path)
    bad = evil_checkpoint(tmp_path / "in" / "evil.pt", marker)
    models = tmp_path / "no_models"
    out = tmp_path / "out"
    argv = {"protect": (protect.main, [scan, "-c", bad, "-o", out]),
            "evaluate": (evaluate.main, ["--methods", "mitsgan", "--checkpoint", bad, "--data", scan.parent,
                                         "--models", models, "--out", out]),
            "GUI": (GUI.main, ["--scan", scan, "--checkpoint", bad, "--models", models, "--out", out]),
            "train": (train.main, _train(scan.parent, out, Ctx(tmp_path, empty_models=models), "--resume", bad))}
    main, args = argv[entry]
    before = tree(tmp_path)
    res = call(main, args, capfd)
    _no_marker(marker)
    assert_refused(res, UNSAFE, ("evil.pt",), tmp_path, before, entry)
    assert "system" in res.err


def test_evaluate_refuses_lpips_weights_that_run_code(tmp_path, capfd):
    marker = tmp_path / "PWNED"
    scan = _scan(tmp_path)
    bad = evil_checkpoint(tmp_path / "in" / "lpips.pt", marker)
    before = tree(tmp_path)
    res = call(evaluate.main, ["--methods", "noise", "--noise-rms", "5", "--lpips-weights", bad,
                               "--data", scan.parent, "--models", tmp_path / "none", "--out", tmp_path / "out"], capfd)
    _no_marker(marker)
    assert_refused(res, UNSAFE, ("lpips.pt",), tmp_path, before)


def test_protect_refuses_a_pickled_npy_scan(ckpt, tmp_path, capfd):
    marker = tmp_path / "PWNED"
    (tmp_path / "in").mkdir()
    bad = evil_npy(tmp_path / "in" / "scan.npy", marker)
    before = tree(tmp_path)
    res = call(protect.main, [bad, "-c", ckpt, "-o", tmp_path / "out"], capfd)
    _no_marker(marker)
    assert_refused(res, ScanFormatError.exit_code, ("scan.npy",), tmp_path, before)


def _attacker_argv(entry: str, scan: Path, models: Path, out: Path, tmp_path: Path):
    if entry == "tamper":
        return tamper.main, ["-t", scan, "-d", out, "-a", "inject", "-c", "10,24,24", "--models", models]
    if entry == "GUI":
        return GUI.main, ["--scan", scan, "--models", models, "--out", out]
    if entry == "evaluate":
        return evaluate.main, ["--methods", "noise", "--noise-rms", "5", "--actions", "inject", "--data",
                               scan.parent, "--models", models, "--out", out, "--no-progress"]
    mode = "whitebox" if entry == "train-whitebox" else "blackbox"
    return train.main, _train(scan.parent, out, Ctx(tmp_path, empty_models=models), "--attack_mode", mode)


@pytest.mark.tf
@pytest.mark.parametrize("entry", ["tamper", "GUI", "evaluate", "train-blackbox", "train-whitebox"])
def test_entry_points_refuse_a_pickle_equaliser_that_runs_code(entry, tiny_ctgan_models, tmp_path, capfd):
    marker = tmp_path / "PWNED"
    scan = _scan(tmp_path)
    models = model_folder(tmp_path / "models", tiny_ctgan_models, eq=evil_pickle(tmp_path / "e.pkl", marker))
    (tmp_path / "e.pkl").unlink()
    main, argv = _attacker_argv(entry, scan, models, tmp_path / "out", tmp_path)
    before = tree(tmp_path)
    res = call(main, argv, capfd)
    _no_marker(marker)
    assert_refused(res, UNSAFE, ("equalization.pkl",), tmp_path, before, entry.split("-")[0])


@pytest.mark.tf
@pytest.mark.parametrize("entry", ["tamper", "GUI", "evaluate", "train-blackbox", "train-whitebox"])
def test_entry_points_refuse_a_keras_lambda_generator(entry, tiny_ctgan_models, tmp_path, capfd):
    marker = tmp_path / "PWNED"
    scan = _scan(tmp_path)
    g = keras_lambda_model(tmp_path / "lam.h5", marker)
    models = model_folder(tmp_path / "models", tiny_ctgan_models, g=g)
    g.unlink()
    main, argv = _attacker_argv(entry, scan, models, tmp_path / "out", tmp_path)
    before = tree(tmp_path)
    res = call(main, argv, capfd)
    _no_marker(marker)
    assert_refused(res, UNSAFE, ("G_model.h5",), tmp_path, before, entry.split("-")[0])
