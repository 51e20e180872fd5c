"""Import Keras 3 on a chosen backend, lazily: TensorFlow is loaded only when the attacker is.

Keras reads KERAS_BACKEND once, at its first import, so the backend must be chosen before
anything imports keras. `tensorflow` is the default on CPU (the published attacker);
`torch` runs the same `.h5` as a torch module (GPU, gradients, no TensorFlow), which is
the path on the lent GPU machine.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import warnings

from utils.errors import UsageError

BACKENDS = ("tensorflow", "torch")


def default_backend() -> str:
    env = os.environ.get("KERAS_BACKEND")
    if env:
        return env
    return "tensorflow" if importlib.util.find_spec("tensorflow") else "torch"


def get_keras(backend: str | None = None):
    """Return the `keras` module on `backend` ('tensorflow', 'torch' or None for default)."""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise UsageError(f"unknown Keras backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if "keras" in sys.modules:
        import keras  # lazy: Keras/TensorFlow only when an attacker model runs
        if keras.backend.backend() != backend:
            raise UsageError(
                f"Keras already runs on {keras.backend.backend()!r} in this process; "
                f"cannot switch to {backend!r} (set KERAS_BACKEND before starting)")
        return keras
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _drop_hdf5_legacy_notice()
    tf = _import_tensorflow(required=backend == "tensorflow")
    if tf is not None and backend == "tensorflow":
        with _quiet_fd2():  # the device probe logs to fd 2 as well
            gpus = tf.config.list_physical_devices("GPU")
        # Share one GPU with PyTorch: allocate on demand instead of grabbing all memory.
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:
                pass  # already initialised; growth can only be set before first use
    try:
        import keras
    except ImportError as e:
        raise UsageError(
            f"Keras 3 is not installed ({e}): pip install -r requirements.txt"
        ) from None
    return keras


def _import_tensorflow(required: bool):
    """TensorFlow, imported now with its start-up lines silenced; None when it is not installed
    and not `required`. Its C++ start-up writes absl and CUDA-probe lines (no GPU driver found)
    straight to fd 2, which TF_CPP_MIN_LOG_LEVEL does not stop. Keras imports TensorFlow for
    every .h5 save or load even on the torch backend, so it is imported here, quietly, once."""
    installed = "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow")
    if not installed and not required:
        return None
    with _quiet_fd2():
        try:
            import tensorflow as tf  # lazy: only with the Keras attacker
        except ImportError as e:
            if not required:
                return None
            raise UsageError(f"Keras backend 'tensorflow' is not installed ({e}); "
                             "use --keras_backend torch") from None
    return tf


# Keras 3 logs this on every .h5 save; the published weights are .h5, so we keep the format
# on purpose (docs/attack.md#model-folders) and drop only this one notice.
_HDF5_LEGACY = "You are saving your model as an HDF5 file"


class _NoHdf5Legacy(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_HDF5_LEGACY)


def _drop_hdf5_legacy_notice() -> None:
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _NoHdf5Legacy) for f in absl.filters):
        absl.addFilter(_NoHdf5Legacy())
    warnings.filterwarnings("ignore", message=_HDF5_LEGACY)


@contextlib.contextmanager
def _quiet_fd2():
    """Send file descriptor 2 to /dev/null for the duration (C-level writes included)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
