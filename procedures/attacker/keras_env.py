"""Import Keras 3 on a chosen backend, lazily: TensorFlow is loaded only when the attacker is.

Keras reads KERAS_BACKEND once, at its first import, so the backend must be chosen before
anything imports keras. `tensorflow` is the default on CPU (the published attacker);
`torch` runs the same `.h5` as a torch module (GPU, gradients, no TensorFlow), which is
the path on the lent GPU machine.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

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
    if backend == "tensorflow":
        # TensorFlow's C++ start-up writes absl/CUDA-probe lines straight to fd 2, which
        # TF_CPP_MIN_LOG_LEVEL does not stop: keep stderr for our one-line messages.
        with _quiet_fd2():
            try:
                import tensorflow as tf
            except ImportError as e:
                raise UsageError(f"Keras backend 'tensorflow' is not installed ({e}); "
                                 "use --keras_backend torch") from None
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
        raise UsageError(f"Keras 3 is not installed ({e}): pip install -r requirements.txt") from None
    return keras


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
