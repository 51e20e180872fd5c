"""Checkpoints: written atomically, read with `weights_only=True` (no code from strangers)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from utils.errors import ModelFileError, OutputError


def save_checkpoint(path, state: dict) -> None:
    """torch.save to `<name>.tmp`, fsync, then rename: a kill mid-write leaves the old file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write checkpoint ({e.strerror or e})") from None


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle refusals and corrupt files alike: one line, no traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"{path}: not a loadable MITS-GAN checkpoint ({msg[:160]})") from None
    if not isinstance(state, dict) or "generator" not in state or "config" not in state:
        raise ModelFileError(f"{path}: not a MITS-GAN checkpoint (no generator/config)")
    return state
