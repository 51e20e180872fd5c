"""The one loader of CT-GAN model folders (docs/attack.md#model-folders).

A model folder holds the generator (`G_model.h5`; the published README's names
`G_model_inj.h5` / `G_model_rem.h5` are accepted too), `normalization.npy` ([mean, min, max] of
the equalised training set) and the equaliser (`equalization.npz`, or the published `.pkl`
read by the restricted loader). A models folder holds one model folder per action: `INJ/` and
`REM/`. Every attacker (procedures.attacker.interface) loads its folders through `model_files`,
so each checks the same files and says the same things about them.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from utils.errors import ModelFileError, UnsafeFileError

G_NAMES = ("G_model.h5", "G_model_inj.h5", "G_model_rem.h5")   # code vs README names
EQ_NAMES = ("equalization.npz", "equalization.pkl")
NORM_NAME = "normalization.npy"
SUBDIR = {"inject": "INJ", "remove": "REM"}


class ModelFiles(NamedTuple):
    generator: Path
    norm: np.ndarray              # [mean, min, max], max != min
    equalizer: Path


def model_files(folder, *, missing_ok: bool = False) -> ModelFiles | None:
    """The files of one model folder, its normalisation read. A missing folder or file raises
    ModelFileError, or gives None with `missing_ok` (the published missing-model behaviour)."""
    folder = Path(folder)

    def missing(msg):
        if missing_ok:
            return None
        raise ModelFileError(msg)

    if not folder.is_dir():
        return missing(f"{folder}: model folder not found")
    g = next((folder / n for n in G_NAMES if (folder / n).is_file()), None)
    if g is None:
        return missing(f"{folder}: no generator file ({' / '.join(G_NAMES)})")
    norm = folder / NORM_NAME
    if not norm.is_file():
        return missing(f"{norm}: normalization file not found")
    eq = next((folder / n for n in EQ_NAMES if (folder / n).is_file()), None)
    if eq is None:
        return missing(f"{folder}: no equaliser ({' or '.join(EQ_NAMES)})")
    return ModelFiles(g, load_norm(norm), eq)


def load_norm(path) -> np.ndarray:
    """[mean, min, max] from a plain .npy (object arrays, i.e. pickles, are refused)."""
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ModelFileError(f"{path}: not a NumPy array file ({type(e).__name__})") from None
    a = np.asarray(a, dtype=np.float64).ravel() if a.dtype.kind in "fiu" else None
    if a is None or a.shape != (3,) or not np.all(np.isfinite(a)) or a[2] == a[1]:
        raise ModelFileError(f"{path}: expected [mean, min, max] with max != min")
    return a


def load_differentiable(inj_dir=None, rem_dir=None, device=None, **kw):
    """procedures.attacker.port.DifferentiableTamper from an injector and/or remover folder;
    `kw` are its options (resample, clamp, work_dtype)."""
    from procedures.attacker.h5_weights import from_keras_h5  # lazy: torch and h5py
    from procedures.attacker.port import DifferentiableTamper

    parts = []
    for d in (inj_dir, rem_dir):
        files = model_files(d) if d is not None else None
        parts.append((from_keras_h5(files.generator), files.equalizer, files.norm) if files
                     else (None, None, None))
    (gi, ei, ni), (gr, er, nr) = parts
    module = DifferentiableTamper(gi, gr, ei, er, ni, nr, **kw)
    return module.to(device) if device is not None else module


def load_attacker_pair(models, device=None, actions=("inject", "remove"), **kw):
    """The differentiable CT-GAN of a models folder (INJ/, REM/) as the protection code uses it:
    SciPy's spline resampling (as the Keras pipeline), a straight-through clamp (saturation
    keeps its gradient) and float32 work; `kw`: other DifferentiableTamper options (touchups)."""
    import torch  # lazy: the folder checks above need no torch

    models = Path(models)
    return load_differentiable(
        models / SUBDIR["inject"] if "inject" in actions else None,
        models / SUBDIR["remove"] if "remove" in actions else None,
        device=device, resample="spline", clamp="straight_through", work_dtype=torch.float32,
        **kw)


def load_keras_model(keras, path, what: str = "Keras model"):
    """A Keras model file loaded in safe mode (no Lambda layers, no code): a file that asks to
    run code is refused as unsafe, any other failure is a model-file error, each in one line."""
    try:
        return keras.models.load_model(str(path), compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001 - h5py/Keras raise many types; one line, no traceback
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if "safe_mode" in str(e) or "Lambda" in str(e):
            raise UnsafeFileError(f"{path}: refused, the model asks to run code ({msg})") from None
        raise ModelFileError(f"{path}: cannot load the {what} ({type(e).__name__}: {msg})") from None
