"""Seal keys: 32 random bytes in a file only its owner may read (docs/seal.md#keeping-the-key).

The key itself never appears in any message, log or output; errors name the file only.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from utils.atomic import os_error_message
from utils.errors import InputFileError, KeyFileError, OutputError

KEY_BYTES = 32


def make_key(path: str | os.PathLike) -> Path:
    """Write a new key to `path` (mode 0600). An existing `path` is never overwritten: the key
    is written under a temporary name and linked into place, which fails if `path` exists."""
    path = Path(path)
    if os.path.lexists(path):
        raise OutputError(f"cannot write {path}: exists (refusing to overwrite a key)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        raise OutputError(f"cannot write {path}: exists (refusing to overwrite a key)") from None
    except OSError as e:
        raise OutputError(os_error_message(path, e)) from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return path


def read_key(path: str | os.PathLike) -> bytes:
    """The key in `path`; refused when missing, not 32 bytes, or readable by other users."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such key file") from None
    except OSError as e:
        raise InputFileError(f"{path}: cannot read the key file ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: not a key file (a key file is a regular file)")
    if st.st_mode & 0o077:
        raise KeyFileError(f"{path}: other users may read or write this key (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}); run chmod 600 on it")
    if st.st_size != KEY_BYTES:
        raise KeyFileError(f"{path}: not a seal key ({st.st_size} bytes; a key is {KEY_BYTES} "
                           f"random bytes made by verify.py --make-key)")
    try:
        with open(path, "rb") as f:
            key = f.read(KEY_BYTES + 1)
    except OSError as e:
        raise InputFileError(f"{path}: cannot read the key file ({e.strerror})") from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{path}: not a seal key (changed while being read)")
    return key
