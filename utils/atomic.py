"""Atomic output helpers: a crash, a full disk or a read-only folder never leaves a partial file.

Everything is written under a hidden temporary name in the destination folder (same file
system, so `os.replace` is atomic) and renamed into place only once complete.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from utils.errors import OutputError

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "folder does not exist",
    errno.ENOTDIR: "a parent is not a folder",
    errno.EISDIR: "is a folder",
}


def os_error_message(path: str | os.PathLike, err: OSError) -> str:
    """One line: 'cannot write <path>: <reason>'."""
    reason = _REASONS.get(err.errno, err.strerror or str(err))
    return f"cannot write {os.fspath(path)}: {reason}"


def _tmp_name(path: Path, suffix: str = "") -> Path:
    # Hidden, unique, same folder. Keeps the final extension so that libraries choosing a
    # format by extension (SimpleITK) still do the right thing.
    tag = secrets.token_hex(4)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{tag}{suffix}")


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, keep_suffix: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success `os.replace` it onto `path`, on any
    failure delete it. OSError becomes OutputError (one line, names `path`)."""
    path = Path(path)
    tmp = _tmp_name(path, path.suffix if keep_suffix else "")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise OutputError(os_error_message(path, e)) from None
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, allow_existing_empty: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success rename it to `path`.

    A non-empty existing `path` is refused up front (OutputError); an empty one is replaced.
    On failure the temporary folder is deleted, so `path` never holds a half-written series."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"cannot write {path}: exists and is not a folder")
        if any(path.iterdir()) or not allow_existing_empty:
            raise OutputError(
                f"cannot write {path}: folder exists and is not empty (refusing to overwrite)"
            )
    tmp = _tmp_name(path)
    try:
        tmp.mkdir(parents=False)
        yield tmp
        if path.exists():
            path.rmdir()  # empty (checked above); os.replace cannot replace a folder on all OSes
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise OutputError(os_error_message(path, e)) from None
    except BaseException:
        _remove(tmp)
        raise


def check_output_dir(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output folder that cannot be created or written: a parent
    that is a regular file, a read-only file system, no permission. Creates nothing.

    `path` is the folder outputs go into (it may not exist yet)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write {path}: exists and is not a folder")
    probe = path
    while not probe.exists():  # the nearest existing ancestor decides (lexists: dangling links too)
        if probe.is_symlink():
            raise OutputError(f"cannot write {path}: {probe} is a dangling symbolic link")
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(os_error_message(path, OSError(errno.ENOTDIR, "Not a directory")))
    # access() reports a read-only file system (EROFS) even to root, and missing permissions to
    # other users; root ignores mode bits, as the real write will.
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            st = os.statvfs(probe)
            ro = bool(st.f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):
            ro = False
        err = errno.EROFS if ro else errno.EACCES
        raise OutputError(os_error_message(path, OSError(err, os.strerror(err))))


def _real(p: str | os.PathLike) -> str:
    # os.path.realpath never raises (Path.resolve raises RuntimeError on a symlink loop).
    return os.path.realpath(os.fspath(p))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """One file under two names: a symbolic link, a hard link (same inode) or a name that
    differs only in case (the same file on a case-insensitive file system; refused everywhere
    so that a scan copied between systems stays safe)."""
    try:
        if os.path.samefile(a, b):
            return True
    except (OSError, ValueError):
        pass
    return _real(a).casefold() == _real(b).casefold()


def ensure_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse (OutputError) when `out` is one of `inputs` (see same_file) or lies inside an
    input folder (a DICOM series folder)."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        try:
            os.stat(out)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputError(f"cannot write {out}: it is a symbolic link loop") from None
    real_out = _real(out).casefold()
    for inp in inputs:
        if inp is None:
            continue
        inp = Path(inp)
        if same_file(out, inp):
            kind = "input folder" if inp.is_dir() else "input"
            raise OutputError(f"cannot write {out}: it is the {kind} {inp} (refusing to overwrite)")
        if inp.is_dir() and real_out.startswith(_real(inp).casefold().rstrip(os.sep) + os.sep):
            raise OutputError(
                f"cannot write {out}: it is inside the input DICOM folder {inp} (refusing to overwrite)"
            )


@contextlib.contextmanager
def removed_on_failure(folder: str | os.PathLike, *patterns: str) -> Iterator[None]:
    """Files matching any of `patterns` in `folder` that the block creates or rewrites are deleted when
    the block fails: a run that ends in an error leaves none of its outputs behind."""
    folder = Path(folder)

    def stamp() -> dict[Path, int]:
        try:
            return {p: p.stat().st_mtime_ns for pat in patterns for p in folder.glob(pat)}
        except OSError:
            return {}

    before = stamp()
    try:
        yield
    except BaseException:
        for p, t in stamp().items():
            if before.get(p) != t:
                with contextlib.suppress(OSError):
                    p.unlink()
        raise
