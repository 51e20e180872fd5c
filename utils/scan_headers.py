"""Header pre-checks: what a scan file declares, checked against its data and against the
memory available, before any reader allocates or reads a voxel.

SimpleITK reports a truncated .raw as 'No such file or directory', zero-fills a short
compressed stream, reads a header that lies about the voxel type as garbage and allocates
whatever a header declares (a 4 KB NRRD claiming 1500^3 voxels takes gigabytes before failing):
each of those becomes one line here instead.
"""
from __future__ import annotations

import gzip
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from utils.errors import InputFileError, ScanFormatError
from utils.scan import check_memory
from utils.scan_paths import (
    data_file_beside,
    mhd_data_name,
    nrrd_data_name,
    read_mhd_header,
    read_nrrd_header,
)

_CHUNK = 1 << 20

MET_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}
# NRRD type names (NRRD0005 specification) -> bytes per value.
_NRRD_SIZES = {}
for _size, _names in (
    (1, "signed char|int8|int8_t|uchar|unsigned char|uint8|uint8_t"),
    (
        2,
        "short|short int|signed short|signed short int|int16|int16_t|ushort|unsigned short|"
        "unsigned short int|uint16|uint16_t",
    ),
    (4, "int|signed int|int32|int32_t|uint|unsigned int|uint32|uint32_t|float"),
    (
        8,
        "longlong|long long|long long int|signed long long|signed long long int|int64|int64_t|"
        "ulonglong|unsigned long long|unsigned long long int|uint64|uint64_t|double",
    ),
):
    _NRRD_SIZES.update(dict.fromkeys(_names.split("|"), _size))


def _read_header(reader, path: Path):
    try:
        return reader(path)
    except OSError as e:
        raise InputFileError(f"{path}: cannot read ({e.strerror})") from None


def inflated_size(path: Path, offset: int, stop_after: int, *, gzip_ok: bool = False,
                  owner: Path | None = None) -> int:
    """Bytes a zlib (or gzip) stream starting at `offset` inflates to, counted in bounded memory
    and stopped once above `stop_after`. A stream that is corrupt or ends early (truncated file)
    is a one-line ScanFormatError: the readers would otherwise fill the rest with zeros."""
    wbits = 47 if gzip_ok else 15  # 47: zlib or gzip header, auto-detected
    label = f"{owner}: compressed data {path.name}" if owner is not None and owner != path else \
        f"{path}: compressed data"
    total = 0
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            d = zlib.decompressobj(wbits)
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                while chunk:
                    out = d.decompress(chunk, _CHUNK * 16)
                    total += len(out)
                    if total > stop_after:
                        return total
                    chunk = d.unconsumed_tail
                    if d.eof:
                        rest = d.unused_data + f.read()
                        if not (gzip_ok and rest.lstrip(b"\0")):
                            return total
                        d = zlib.decompressobj(wbits)  # another gzip member
                        chunk = rest
            total += len(d.flush())
            if not d.eof:
                raise ScanFormatError(f"{label} is truncated (ends after {total} bytes)")
    except zlib.error as e:
        raise ScanFormatError(f"{label} is corrupt ({e})") from None
    except OSError as e:
        raise InputFileError(f"{path}: cannot read ({e.strerror})") from None
    return total


def _size_mismatch(
    path: Path, data: Path, have: int, want: int, what: str, *, exact: bool = True
) -> None:
    """The data must be what the header describes: fewer bytes is a truncated file (the readers
    zero-fill or fail with a misleading message), more bytes a header that lies about the size
    or the voxel type (the readers silently return garbage)."""
    if have < want:
        raise ScanFormatError(
            f"{path}: data {data.name} is truncated or the header lies about the size "
            f"({have} bytes, {what} needs {want})"
        )
    if exact and have > want:
        raise ScanFormatError(
            f"{path}: the header lies about the size or voxel type: data {data.name} "
            f"has {have} bytes, {what} describes {want}"
        )


def _dims(path: Path, text: str, what: str) -> list[int]:
    try:
        dims = [int(v) for v in text.split()]
    except ValueError:
        raise ScanFormatError(f"{path}: bad {what} '{text}'") from None
    if not dims or any(d < 1 for d in dims):
        raise ScanFormatError(f"{path}: bad {what} '{text}' (sizes must be positive)")
    if len(dims) < 3:
        raise ScanFormatError(f"{path}: is a {len(dims)}-D image ({what} {text}), a 3-D CT volume "
                              f"is needed")
    return dims


def _positive(path: Path, h: dict[str, str], key: str) -> None:
    """A spacing field, when present, is positive finite numbers (SimpleITK's own message for
    NaN or zero names a memory address)."""
    if key not in h:
        return
    try:
        v = [float(x) for x in h[key].split()]
    except ValueError:
        v = []
    if not v or not all(np.isfinite(x) and x > 0 for x in v):
        raise ScanFormatError(f"{path}: bad {key} '{h[key]}'; each value must be a positive number")


# Header fields that hold geometry: SimpleITK reads a value it cannot parse ('nan', 'inf',
# text) as 0 without a word, so an origin of 'nan 0 inf' would become 0 0 0 in the output.
_MHD_GEOMETRY = ("Offset", "Origin", "Position", "ElementSpacing", "ElementSize", "TransformMatrix",
                 "Rotation", "Orientation", "CenterOfRotation")
_NRRD_GEOMETRY = ("space origin", "spacings", "space directions", "thicknesses")


def _finite(path: Path, fields: dict[str, str], keys) -> None:
    """Every number of the geometry fields present is a finite number ('none' stands for a
    non-spatial NRRD axis)."""
    for key in keys:
        if key not in fields:
            continue
        words = [w for w in re.split(r"[\s,()]+", fields[key]) if w and w.lower() != "none"]
        try:
            ok = bool(words) and all(np.isfinite(float(w)) for w in words)
        except ValueError:
            ok = False
        if not ok:
            raise ScanFormatError(f"{path}: bad {key} '{fields[key][:80]}'; geometry must be "
                                  f"finite numbers")


def _data_file(path: Path, name: str, kind: str) -> Path:
    if name.upper() == "LIST" or "%" in name or len(name.split()) > 1:
        raise ScanFormatError(
            f"{path}: names a list or pattern of {kind} data files; only one data file "
            f"beside the header is supported"
        )
    raw = data_file_beside(path, name)
    if not raw.exists():
        raise InputFileError(f"{path}: its data file {raw} does not exist")
    if not raw.is_file():
        raise ScanFormatError(f"{path}: its data file {raw} is not a file")
    return raw


def precheck_mhd(path: Path) -> None:
    """A MetaImage (.mhd/.mha) header against its data file and the memory available."""
    h, local_offset = _read_header(read_mhd_header, path)
    if "DimSize" not in h or "ElementType" not in h or "ElementDataFile" not in h:
        raise ScanFormatError(
            f"{path}: not a MetaImage header (DimSize/ElementType/ElementDataFile missing)"
        )
    dims = _dims(path, h["DimSize"], "DimSize")
    _positive(path, h, "ElementSpacing")
    _finite(path, h, _MHD_GEOMETRY)
    local = mhd_data_name(h).upper() == "LOCAL"
    raw = path if local else _data_file(path, mhd_data_name(h), "MetaImage")
    size = MET_SIZES.get(h["ElementType"])
    try:
        channels = int(h.get("ElementNumberOfChannels", "1") or 1)
    except ValueError:
        raise ScanFormatError(f"{path}: bad ElementNumberOfChannels") from None
    n = int(np.prod(dims, dtype=np.int64)) * max(channels, 1)
    check_memory(n, size or 8, path)
    header_size = h.get("HeaderSize", "0") or "0"
    if not size or header_size not in ("0", ""):
        return  # unknown type (SimpleITK says so) or skipped bytes: no exact size to check
    want = n * size
    offset = local_offset if local else 0
    what = f"DimSize {h['DimSize']} {h['ElementType']}"
    if h.get("CompressedData", "False").lower() == "true":
        have = inflated_size(raw, offset, want, owner=path)
    else:
        have = raw.stat().st_size - offset
    _size_mismatch(path, raw, have, want, what)


def precheck_nrrd(path: Path) -> None:
    """A NRRD (.nrrd attached, .nhdr detached) header against its data and the memory available."""
    fields, end = _read_header(read_nrrd_header, path)
    for key in ("type", "sizes", "encoding"):
        if key not in fields:
            raise ScanFormatError(f"{path}: NRRD header without the required field '{key}'")
    dims = _dims(path, fields["sizes"], "sizes")
    _finite(path, fields, _NRRD_GEOMETRY)
    size = _NRRD_SIZES.get(fields["type"].lower())
    if size is None:
        raise ScanFormatError(f"{path}: NRRD type '{fields['type']}' is not a number type")
    n = int(np.prod(dims, dtype=np.int64))
    check_memory(n, size, path)
    name = nrrd_data_name(fields)
    if name is None:
        if end is None:
            raise ScanFormatError(
                f"{path}: NRRD header has no end (blank line) and names no data file"
            )
        data, offset = path, end
    else:
        data, offset = _data_file(path, name, "NRRD"), 0
    try:
        skip = int(fields.get("byte skip", "0"))
        lines = int(fields.get("line skip", "0"))
    except ValueError:
        raise ScanFormatError(f"{path}: bad NRRD byte skip or line skip") from None
    exact = skip == 0 and lines == 0
    want = n * size
    enc = fields["encoding"].lower()
    if enc == "raw":
        have = data.stat().st_size - offset - max(skip, 0)
    elif enc in ("gzip", "gz"):
        have = inflated_size(data, offset, want, gzip_ok=True, owner=path) if exact else want
    elif enc in ("ascii", "text", "txt"):
        have, want, exact = data.stat().st_size - offset, n, False  # at least one character a value
    elif enc == "hex":
        have, want, exact = data.stat().st_size - offset, 2 * want, False
    else:
        return  # bzip2: SimpleITK reads it; the memory check above already holds
    _size_mismatch(path, data, have, want, f"sizes {fields['sizes']} {fields['type']}", exact=exact)


def _nifti_dims(path: Path, head: bytes) -> tuple[list[int], int, int, int] | None:
    """(dims, bits per voxel, data offset, header size) of a NIfTI-1/2 or Analyze header."""
    for end in "<>":
        n = struct.unpack(end + "i", head[:4])[0]
        if n in (348, 540):
            break
    else:
        return None  # not NIfTI/Analyze: SimpleITK decides
    if n == 348:
        dim = struct.unpack(end + "8h", head[40:56])
        bitpix = struct.unpack(end + "h", head[72:74])[0]
        vox_offset = int(struct.unpack(end + "f", head[108:112])[0])
    else:
        if len(head) < 540:
            raise ScanFormatError(f"{path}: truncated NIfTI-2 header ({len(head)} bytes)")
        bitpix = struct.unpack(end + "h", head[14:16])[0]
        dim = struct.unpack(end + "8q", head[16:80])
        vox_offset = struct.unpack(end + "q", head[168:176])[0]
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dim[1:ndim + 1]) or bitpix < 1:
        raise ScanFormatError(f"{path}: bad NIfTI header (dim {list(dim)}, bitpix {bitpix})")
    return list(dim[1:ndim + 1]), bitpix, vox_offset, n


def precheck_nifti(path: Path) -> None:
    """NIfTI-1/2 (.nii, .nii.gz) and NIfTI/Analyze pairs (.hdr + .img): the data must be as long
    as the header says (SimpleITK zero-fills a truncated file) and fit in memory."""
    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(544)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ScanFormatError(f"{path}: not a readable NIfTI file ({e})") from None
    if len(head) < 348:
        raise ScanFormatError(f"{path}: truncated NIfTI header ({len(head)} bytes)")
    found = _nifti_dims(path, head)
    if found is None:
        return
    dims, bitpix, vox_offset, hsize = found
    n = int(np.prod(dims, dtype=np.int64))
    check_memory(n, max(bitpix // 8, 1), path)
    pair = path.name.lower().endswith(".hdr")
    data = path.with_suffix(".img") if pair else path
    if pair and not data.is_file():
        raise InputFileError(f"{path}: its data file {data.name} does not exist")
    want = (vox_offset if pair else max(vox_offset, hsize)) + n * bitpix // 8
    have = inflated_size(data, 0, want, gzip_ok=True) if gz else data.stat().st_size
    if have < want:
        raise ScanFormatError(f"{data}: is truncated ({have} bytes, its header needs {want})")


def precheck_npy(path: Path) -> tuple[np.dtype, tuple[int, ...], bool]:
    """The .npy header: a plain number type, a 3-D shape the file holds and memory can hold.
    Returns (dtype, shape, fortran_order)."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(f, max_header_size=10000)
            offset = f.tell()
    except OSError as e:
        raise InputFileError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, EOFError, SyntaxError, TypeError) as e:
        raise ScanFormatError(
            f"{path}: not a NumPy array file ({str(e).splitlines()[0][:200]})"
        ) from None
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
        raise ScanFormatError(f"{path}: holds {dtype} values; a CT scan is numbers (int or float)")
    if len(shape) != 3:
        raise ScanFormatError(
            f"{path}: is a {len(shape)}-D array of shape {shape}, a 3-D CT volume is needed"
        )
    n = int(np.prod(shape, dtype=np.int64))
    if n == 0:
        raise ScanFormatError(f"{path}: empty array of shape {shape}")
    check_memory(n, dtype.itemsize, path)
    want = n * dtype.itemsize
    have = path.stat().st_size - offset
    _size_mismatch(path, path, have, want, f"shape {shape} {dtype}")
    return dtype, shape, fortran
