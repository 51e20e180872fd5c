"""Shared fixtures: tiny synthetic HU volumes, and the real scans fetched by `make data`."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from utils.phantom import phantom as make_phantom  # the one synthetic chest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"

# Keep TensorFlow quiet and single-threaded enough for CI's 2 cores.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def phantom():
    return make_phantom()


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Folder with the real scans at native spacing (lung1.mhd, lung2.mhd, CSVs)."""
    d = DATA / "native"
    if not (d / "lung1.mhd").exists():
        pytest.fail("real scans missing: run `make data` (the test command does it for you)")
    return d


def build_tiny_ctgan_models(root: Path, gf: int = 2, seed: int = 0, g_name: str = "G_model.h5") -> Path:
    """Write INJ/ and REM/ model folders under `root`: a random gf-wide generator, an equaliser
    fitted on phantom cubes and its [mean, min, max] (as CT-GAN's trainer saves them)."""
    from procedures.ctgan.models import build_generator
    from procedures.attacker.keras_env import get_keras
    from utils.equalizer import HistEqualizer

    keras = get_keras()
    vol = make_phantom((40, 64, 64), seed=seed).astype(np.float64)
    cubes = np.stack([vol[4:36, 16:48, 16:48], vol[4:36, 0:32, 0:32], vol[8:40, 32:64, 8:40]])
    eq = HistEqualizer.fit(cubes)
    e = eq.equalize(cubes)
    for i, sub in enumerate(("INJ", "REM")):
        d = root / sub
        d.mkdir(parents=True, exist_ok=True)
        keras.utils.set_random_seed(seed + i)
        build_generator(keras, gf=gf).save(d / g_name)
        np.save(d / "normalization.npy", np.array([e.mean(), e.min(), e.max()]))
        eq.save(d / "equalization.npz")
    return root


@pytest.fixture(scope="session")
def tiny_ctgan_models(tmp_path_factory) -> Path:
    return build_tiny_ctgan_models(tmp_path_factory.mktemp("ctgan_models"))


# ==============================================================================================
# bad-input suites: a valid tiny checkpoint and model folders (tests/entry_points.py)
# ==============================================================================================
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from helpers import make_tiny_checkpoint  # helpers imports this module: import when used

    return make_tiny_checkpoint(tmp_path_factory.mktemp("bad_inputs_ckpt"))


@pytest.fixture(scope="module")
def empty_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("empty_models")
    for sub in ("INJ", "REM"):
        (d / sub).mkdir()
    return d


@pytest.fixture(scope="module")
def held_ctgan_models(tiny_ctgan_models):
    """The tiny CT-GAN folder, its injector kept loaded: evaluate's ScanManipulator then reuses
    it (CTGANModel.shared) instead of loading the Keras model again for every bad input."""
    from procedures.attacker.model_dir import SUBDIR
    from procedures.attacker.pipeline import CTGANModel

    held = CTGANModel.shared(tiny_ctgan_models / SUBDIR["inject"])
    yield tiny_ctgan_models
    del held
