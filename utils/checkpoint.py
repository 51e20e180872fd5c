"""Checkpoints: written atomically, read with `weights_only=True` (no code from strangers)."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

from utils.errors import ModelFileError, OutputError, UnsafeFileError


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (power loss); harmless where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path, state: dict) -> None:
    """torch.save to `<name>.tmp`, fsync, then rename: a kill mid-write leaves the old file.

    Any failure (full disk, read-only folder, an object torch cannot pickle) removes the
    temporary file; an OSError becomes a one-line OutputError."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as RuntimeError('[enforce fail at inline_container.cc]
        # ... unexpected pos'), the OSError(ENOSPC) being its context.
        os_err = _os_error_in_chain(e)
        if isinstance(e, RuntimeError) and os_err is None and "inline_container" not in str(e):
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = (
            (os_err.strerror or str(os_err)) if os_err is not None else "write failed (disk full?)"
        )
        raise OutputError(f"{path}: cannot write checkpoint ({reason})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _os_error_in_chain(e: BaseException) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


def torch_load_weights(path, map_location="cpu", what: str = "weights file"):
    """torch.load(weights_only=True) with one-line errors.

    A pickle that asks for a global outside torch's allow-list (os.system, builtins.eval, any
    class with __reduce__) is refused before anything runs: UnsafeFileError naming the global.
    (torch's own message advises retrying with weights_only=False; we never do.) Any other
    failure (truncated, not a torch file, a folder) is a ModelFileError."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types; all become one line
        text = str(e)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if "Weights only load failed" in text:
            m = _GLOBAL.search(text)
            if m:  # every pickle that runs code names a callable (GLOBAL / STACK_GLOBAL)
                raise UnsafeFileError(f"{path}: refused: the {what} asks to run code (global "
                                      f"{m.group(1)}); not loaded") from None
            # torch's first line only advises weights_only=False; the reason is further down
            detail = next(
                (ln for ln in lines if ln.startswith(("Unsupported", "Unpickling", "Invalid"))),
                "unreadable pickle",
            )
            raise ModelFileError(f"{path}: not a loadable {what} (corrupt or not a PyTorch file: "
                                 f"{detail[:120]})") from None
        msg = lines[0] if lines else type(e).__name__
        raise ModelFileError(f"{path}: not a loadable {what} ({msg[:160]})") from None


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: checkpoint not found" if not path.exists()
                             else f"{path}: checkpoint is not a file")
    state = torch_load_weights(path, map_location, what="MITS-GAN checkpoint")
    if not isinstance(state, dict) or "generator" not in state or "config" not in state:
        raise ModelFileError(f"{path}: not a MITS-GAN checkpoint (no generator/config)")
    return state


def load_state_into(obj, state, path, what: str) -> None:
    """obj.load_state_dict(state) (a module or an optimiser) with a one-line ModelFileError
    when the saved state does not fit (another architecture, width or optimiser)."""
    try:
        obj.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[:2])[:240] if lines else type(e).__name__
        raise ModelFileError(f"{path}: the saved {what} does not fit this run ({detail})") from None
