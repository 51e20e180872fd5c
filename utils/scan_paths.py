"""Which files a scan input reads, which files an output writes, and the guard between them.

A MetaImage or NRRD header names its data file; that file is as much the input as the header.
A header may name only a file beside it (no folders, no absolute paths, no link out of its
folder): otherwise a downloaded scan could read /etc/passwd into an output, and an output
named like the data file would replace the input's voxels.
"""
from __future__ import annotations

import os
from pathlib import Path

from utils.atomic import ensure_not_input
from utils.errors import OutputError, ScanFormatError

_HEAD_BYTES = 65536

# The one list of scan file names, longest first (".nii.gz" before ".nii"): what load_scan
# reads as a scan, a data folder lists, and scan_stem strips. A DICOM series is a folder; the
# data halves (.raw, .zraw, .img) are read through their headers.
SCAN_SUFFIXES = (".nii.gz", ".mhd", ".mha", ".nrrd", ".nhdr", ".nii", ".hdr", ".npy")


def is_scan_name(path: str | os.PathLike) -> bool:
    """The file name ends in a scan suffix (case-insensitive)."""
    return Path(path).name.lower().endswith(SCAN_SUFFIXES)


def scan_stem(path: str | os.PathLike) -> str:
    """A scan's name without its format suffix ("lung.nii.gz" -> "lung", "a.b.mhd" -> "a.b");
    a DICOM folder's name as it is."""
    name = Path(path).name
    for suffix in SCAN_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_mhd_header(path: Path) -> tuple[dict[str, str], int]:
    """(key -> value, byte offset just after the ElementDataFile line = LOCAL data start)."""
    with open(path, "rb") as f:
        raw = f.read(_HEAD_BYTES)
    header, pos = {}, 0
    for line in raw.split(b"\n"):
        pos += len(line) + 1
        text = line.decode("latin-1")
        if "=" in text:
            k, v = text.split("=", 1)
            header[k.strip()] = v.strip()
            if k.strip() == "ElementDataFile":
                break
    return header, min(pos, len(raw))


def read_nrrd_header(path: Path) -> tuple[dict[str, str], int | None]:
    """(field -> value with lower-case field names, byte offset of attached data or None when
    the header has no blank line ending it within its first 64 KB)."""
    with open(path, "rb") as f:
        raw = f.read(_HEAD_BYTES)
    if not raw.startswith(b"NRRD"):
        raise ScanFormatError(f"{path}: not a NRRD file (no NRRD magic)")
    fields, pos, end = {}, 0, None
    for i, line in enumerate(raw.split(b"\n")):
        pos += len(line) + 1
        text = line.decode("latin-1").rstrip("\r")
        if i == 0 or text.startswith("#"):
            continue
        if not text.strip():
            end = pos
            break
        if ":=" in text:  # key/value pair, not a field
            continue
        if ":" in text:
            k, v = text.split(":", 1)
            fields[k.strip().lower()] = v.strip()
    return fields, end


def data_file_beside(header: Path, name: str) -> Path:
    """The data file `name` of `header`, which must be a plain file name in the header's folder."""
    parts = name.replace("\\", "/")
    if not name or "/" in parts or name in (".", "..") or os.path.isabs(name):
        raise ScanFormatError(f"{header}: names data file {name!r}, which is not beside it; "
                              f"a header may only name a file in its own folder")
    data = header.parent / name
    if os.path.realpath(data.parent) != os.path.dirname(os.path.realpath(data)):
        raise ScanFormatError(
            f"{header}: its data file {name} is a link out of the header's folder; "
            f"a header may only name a file in its own folder"
        )
    return data


def mhd_data_name(header: dict[str, str]) -> str:
    return header.get("ElementDataFile", "")


def nrrd_data_name(fields: dict[str, str]) -> str | None:
    return fields.get("data file", fields.get("datafile"))


def _named_data(path: Path) -> list[Path]:
    """Files a MetaImage/NRRD header names (unchecked: the guard covers hostile names too)."""
    name = path.name.lower()
    try:
        if name.endswith((".mhd", ".mha")):
            h, _ = read_mhd_header(path)
            names = [mhd_data_name(h)]
        else:
            fields, _ = read_nrrd_header(path)
            names = [nrrd_data_name(fields) or ""]
    except (OSError, ScanFormatError):
        return []
    return [path.parent / n for n in names if n and n.upper() not in ("LOCAL", "LIST")]


def input_files(path: str | os.PathLike) -> list[Path]:
    """Every file (and folder) reading `path` as a scan touches."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        try:
            return [p, *(f for f in p.iterdir() if not f.name.startswith("."))]
        except OSError:
            return [p]
    files = [p]
    if name.endswith((".mhd", ".mha", ".nhdr", ".nrrd")):
        files += _named_data(p)
    if name.endswith(".mhd"):
        files += [p.with_suffix(".raw"), p.with_suffix(".zraw")]
    if name.endswith(".hdr"):
        files.append(p.with_suffix(".img"))
    if name.endswith(".img"):
        files.append(p.with_suffix(".hdr"))
    if name.endswith(".npy"):
        files.append(p.with_suffix(".json"))
    return files


def output_files(target: str | os.PathLike) -> list[Path]:
    """Every file writing `target` creates (a DICOM series target is its folder)."""
    t = Path(target)
    suffix = t.suffix.lower()
    if suffix == ".mhd":
        return [t, t.with_suffix(".raw"), t.with_suffix(".zraw")]
    if suffix == ".npy":
        return [t, t.with_suffix(".json")]
    return [t]


def _inside(child: str, folder: str) -> bool:
    child, folder = child.casefold(), folder.casefold()
    return child == folder or child.startswith(folder.rstrip(os.sep) + os.sep)


def refuse_overwrite(target: str | os.PathLike, source: str | os.PathLike | None) -> None:
    """OutputError unless writing `target` leaves every file of the scan `source` untouched:
    no output may be an input file (through a link, a hard link or a name differing only in
    case), lie inside an input DICOM folder, or be a folder holding an input file."""
    if source is None:
        return
    inputs = input_files(source)
    outputs = output_files(target)
    for out in outputs:
        ensure_not_input(out, inputs)
    t = Path(target)
    if t.suffix.lower() not in (".mhd", ".npy"):  # a folder output (DICOM series)
        real_t = os.path.realpath(t)
        for f in inputs:
            if _inside(os.path.realpath(f), real_t):
                raise OutputError(
                    f"cannot write {t}: the input {f} is inside it (refusing to overwrite)"
                )
