"""CT-GAN's histogram equaliser (docs/attack.md#equaliser), stored safely.

Our format is a `.npz` of two float64 arrays (`centres`, `cdf`), loaded with
`allow_pickle=False`. The published `equalization.pkl` files are pickles; they load only
through `load_legacy_pickle`, which admits the three NumPy globals needed to rebuild arrays
and then checks that the result is a list of two 1-D float arrays of equal length.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from utils.atomic import atomic_path
from utils.errors import ModelFileError, UnsafeFileError

# The only globals a pickled list of float ndarrays needs (numpy 1.x and 2.x spellings).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            if module.startswith("numpy.core"):
                module = "numpy._core" + module[len("numpy.core"):]
            return super().find_class(module, name)
        raise UnsafeFileError(f"refused pickle global {module}.{name}")


class HistEqualizer:
    """equalise(v) = interp(v, centres, cdf); dequalise(v) = interp(v, cdf, centres)."""

    def __init__(self, centres: np.ndarray, cdf: np.ndarray):
        centres = np.asarray(centres, dtype=np.float64)
        cdf = np.asarray(cdf, dtype=np.float64)
        if centres.ndim != 1 or cdf.shape != centres.shape or centres.size < 2:
            raise ModelFileError("equaliser needs two 1-D arrays of the same length")
        if not (np.all(np.isfinite(centres)) and np.all(np.isfinite(cdf))):
            raise ModelFileError("equaliser arrays contain NaN or inf")
        self.centres = centres
        self.cdf = cdf

    @classmethod
    def fit(cls, cubes, bins: int = 10000) -> "HistEqualizer":
        """Fit on a stack of cubes (N, ...): histogram of all voxels / N, cumulative sum.

        As CT-GAN's equalizer: centres = the first `bins` edges shifted by half a bin.
        """
        cubes = np.asarray(cubes)
        hist, edges = np.histogram(cubes.ravel(), bins=bins)
        hist = hist / len(cubes)
        centres = edges[:-1] + (edges[1] - edges[0]) / 2.0
        return cls(centres, np.cumsum(hist))

    def equalize(self, v):
        return np.interp(v, self.centres, self.cdf)

    def dequalize(self, v):
        return np.interp(v, self.cdf, self.centres)

    # --- storage ---------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write `.npz` atomically (hidden tmp name + rename; removed on failure, OutputError)."""
        with atomic_path(Path(path)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, centres=self.centres, cdf=self.cdf)

    @classmethod
    def load(cls, path) -> "HistEqualizer":
        """Load our `.npz`, or a legacy CT-GAN `.pkl` through the restricted loader."""
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: equaliser file not found")
        if path.suffix == ".pkl":
            return load_legacy_pickle(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["centres"], z["cdf"])
        except (ValueError, KeyError, OSError) as e:
            raise ModelFileError(f"{path}: not an equaliser .npz ({e})") from None


def load_legacy_pickle(path) -> HistEqualizer:
    """Load CT-GAN's `equalization.pkl`; refuse any pickle that is not [float array, float array]."""
    path = Path(path)
    data = path.read_bytes()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafeFileError as e:
        raise UnsafeFileError(f"{path}: {e}") from None
    except Exception as e:  # any malformed pickle is a model-file error, never a traceback
        raise ModelFileError(f"{path}: unreadable equaliser pickle ({type(e).__name__})") from None
    if not (
        isinstance(obj, (list, tuple))
        and len(obj) == 2
        and all(isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.ndim == 1 for a in obj)
    ):
        raise UnsafeFileError(f"{path}: equaliser pickle is not a list of two float arrays")
    return HistEqualizer(obj[0], obj[1])
