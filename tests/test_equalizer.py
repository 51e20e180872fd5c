"""utils.equalizer: CT-GAN's histogram equaliser (docs/attack.md#equaliser) and its safe storage."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from utils.equalizer import HistEqualizer, load_legacy_pickle
from utils.errors import ModelFileError, UnsafeFileError

ROOT = Path(__file__).resolve().parents[1]
_REF_CANDIDATES = [ROOT / "shared" / "reference" / "ctgan-lidc",
                   ROOT / "reference" / "ctgan-lidc",
                   ROOT.parent / "shared" / "reference" / "ctgan-lidc"]


def _reference_dir() -> Path:
    for d in _REF_CANDIDATES:
        if (d / "INJ" / "equalization.pkl").is_file():
            return d
    pytest.skip("published reference files (shared/reference/ctgan-lidc) not present")


@pytest.fixture(scope="module")
def dense_eq():
    """Fitted on 20 uniform cubes: ~65 voxels per bin, so every bin is populated."""
    rng = np.random.default_rng(0)
    cubes = rng.uniform(-1000.0, 400.0, size=(20, 32, 32, 32))
    return HistEqualizer.fit(cubes), cubes


def test_fit_matches_spec_on_hand_example():
    # Two "cubes" of two voxels: values 0, 1, 1, 3 in 4 bins over [0, 3] (width 0.75).
    eq = HistEqualizer.fit(np.array([[0.0, 1.0], [1.0, 3.0]]), bins=4)
    # histogram [1, 2, 0, 1] / 2 cubes, cumulated; centres = left edges + half a bin
    np.testing.assert_allclose(eq.cdf, [0.5, 1.5, 1.5, 2.0])
    np.testing.assert_allclose(eq.centres, [0.375, 1.125, 1.875, 2.625])
    # equalise = interp(v, centres, cdf), clamped at both ends
    np.testing.assert_allclose(eq.equalize(np.array([0.375, 0.75, -5.0, 9.0])), [0.5, 1.0, 0.5, 2.0])


def test_default_fit_has_10000_bins_and_cdf_ends_at_voxels_per_cube(dense_eq):
    eq, cubes = dense_eq
    assert eq.centres.shape == eq.cdf.shape == (10000,)
    # cdf is the histogram divided by the number of cubes: it ends at the voxels per cube
    assert eq.cdf[-1] == pytest.approx(32 ** 3)
    assert np.all(np.diff(eq.cdf) >= 0) and np.all(np.diff(eq.centres) > 0)


def test_dequalize_inverts_equalize_within_one_bin(dense_eq):
    eq, cubes = dense_eq
    width = eq.centres[1] - eq.centres[0]
    rng = np.random.default_rng(1)
    v = rng.uniform(cubes.min(), cubes.max(), size=50_000)
    back = eq.dequalize(eq.equalize(v))
    assert np.max(np.abs(back - v)) <= width * (1 + 1e-9)
    # and the equalised values span [cdf[0], cdf[-1]], monotone in v
    e = eq.equalize(np.sort(v))
    assert np.all(np.diff(e) >= 0)


def test_npz_round_trip(tmp_path, dense_eq):
    eq, _ = dense_eq
    p = tmp_path / "equalization.npz"
    eq.save(p)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary
    eq2 = HistEqualizer.load(p)
    np.testing.assert_array_equal(eq2.centres, eq.centres)
    np.testing.assert_array_equal(eq2.cdf, eq.cdf)
    # the file is a plain npz that loads without pickle support
    with np.load(p, allow_pickle=False) as z:
        assert set(z.files) == {"centres", "cdf"}


def test_npz_wrong_content_is_a_model_file_error(tmp_path):
    p = tmp_path / "eq.npz"
    np.savez(p, something=np.zeros(3))
    with pytest.raises(ModelFileError):
        HistEqualizer.load(p)
    with pytest.raises(ModelFileError):
        HistEqualizer.load(tmp_path / "missing.npz")


@pytest.mark.parametrize("which", ["INJ", "REM"])
def test_published_reference_pickles_load_safely(which):
    d = _reference_dir() / which
    eq = load_legacy_pickle(d / "equalization.pkl")
    assert eq.centres.dtype == eq.cdf.dtype == np.float64
    assert eq.centres.shape == eq.cdf.shape == (10000,)
    assert np.all(np.diff(eq.cdf) >= 0)
    # normalization.npy = [mean, min, max] of the equalised training set: max = cdf's end
    norm = np.load(d / "normalization.npy", allow_pickle=False)
    assert norm.shape == (3,)
    assert norm[2] == pytest.approx(eq.cdf[-1], rel=1e-6)
    assert norm[1] <= norm[0] <= norm[2]
    # load() dispatches .pkl to the same restricted loader
    np.testing.assert_array_equal(HistEqualizer.load(d / "equalization.pkl").cdf, eq.cdf)


class _Evil:
    """Its pickle asks the unpickler to call os.system / open: code execution on load."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize("kind", ["system", "open", "eval"])
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, kind):
    marker = tmp_path / "PWNED"
    if kind == "system":
        payload = _Evil(os.system, (f"touch {marker}",))
    elif kind == "open":
        payload = _Evil(open, (str(marker), "w"))
    else:
        payload = _Evil(eval, (f"open({str(marker)!r}, 'w')",))
    p = tmp_path / "equalization.pkl"
    # Even wrapped in the expected list shape, the global lookup is what gets refused.
    p.write_bytes(pickle.dumps([payload, np.zeros(3)]))
    with pytest.raises(UnsafeFileError) as ei:
        load_legacy_pickle(p)
    assert str(p) in str(ei.value)
    assert not marker.exists()


@pytest.mark.parametrize("obj", [
    {"bins": np.linspace(0, 1, 5), "cdf": np.linspace(0, 1, 5)},           # a dict
    [np.linspace(0, 1, 5), np.linspace(0, 1, 5), np.linspace(0, 1, 5)],    # three arrays
    [np.arange(5), np.arange(5)],                                            # int arrays
    [np.zeros((2, 5)), np.zeros((2, 5))],                                    # not 1-D
    "just a string",
], ids=["dict", "three-arrays", "int-arrays", "2d-arrays", "str"])
def test_pickle_of_wrong_shape_is_refused(tmp_path, obj):
    p = tmp_path / "equalization.pkl"
    p.write_bytes(pickle.dumps(obj))
    with pytest.raises(UnsafeFileError):
        load_legacy_pickle(p)


def test_truncated_pickle_is_a_model_file_error(tmp_path):
    p = tmp_path / "equalization.pkl"
    p.write_bytes(pickle.dumps([np.zeros(4), np.zeros(4)])[:40])
    with pytest.raises(ModelFileError):
        load_legacy_pickle(p)
