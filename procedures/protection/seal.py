"""A keyed fragile seal in the pixel data, and its verifier (docs/seal.md).

Each slice is cut into blocks of `block` x `block` voxels (the last block row and column absorb
the remainder, so every block holds at least block^2 voxels). The least significant bits of the
first 64 voxels of a block (raster order within its top-left block x block tile; the "tag
voxels") carry 64 bits:

  56 bits  keyed BLAKE2b of (scan header, block position (z, row, column), the block's voxels with
           the tag voxels' LSB cleared)
   8 bits  one byte of the 36-byte scan header: chunk (block index in its slice) mod 36

The scan header (magic, version, block size, tag length, shape, a random 128-bit nonce) is thus
spread over the pixels; the verifier reads it back by majority vote, and since every block's MAC
covers it, a forged header makes every block fail. The seal changes only the LSB of the tag
voxels: at most 1 HU per voxel, and within a perturbation's +-eps when combined with one
(`seal_volume(reference=, eps=)`). BLAKE2b with a key is a standard MAC (RFC 7693); nothing
else here is cryptography.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import secrets
import struct
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from utils.errors import BlockSizeError, NoSealError, ScanFormatError, UsageError, WrongKeyError
from utils.stored import stored_as

MAGIC = b"MSEA"
VERSION = 1
TAG_BITS = 56
TAG_VOXELS = 64                      # tag + header chunk bits per block
CHUNK_BITS = TAG_VOXELS - TAG_BITS   # 8: one header byte per block
_HEADER = struct.Struct("<4sBBBBIII16s")
HEADER_BYTES = _HEADER.size          # 36
BLOCK_SIZES = range(8, 65)           # 8 x 8 holds the 64 tag voxels; larger blocks localise less
DEFAULT_BLOCK = 8
_PERSON = b"MITS-GAN seal"           # BLAKE2b personalisation: these MACs are for nothing else
_CHUNK_ROW_STEP = 7
_POS = np.dtype([("z", "<u4"), ("row", "<u2"), ("col", "<u2")])


@dataclass(frozen=True)
class SealHeader:
    block: int
    shape: tuple[int, int, int]
    nonce: bytes

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, self.block, TAG_BITS, 0, *self.shape, self.nonce)

    @classmethod
    def unpack(cls, raw: bytes) -> "SealHeader | None":
        magic, version, block, tag_bits, _, nz, ny, nx, nonce = _HEADER.unpack(raw)
        if magic != MAGIC or version != VERSION or tag_bits != TAG_BITS or min(nz, ny, nx) < 1:
            return None
        return cls(int(block), (int(nz), int(ny), int(nx)), bytes(nonce))


@dataclass
class Grid:
    """The block grid of a slice of `ny` x `nx` voxels."""
    block: int
    ny: int
    nx: int
    nby: int = field(init=False)
    nbx: int = field(init=False)

    def __post_init__(self):
        self.nby, self.nbx = self.ny // self.block, self.nx // self.block

    @property
    def fits(self) -> bool:
        """Every block has its tag voxels and a slice carries every header byte."""
        if self.nby < 1 or self.nbx < 1:
            return False
        return len(np.unique(self.chunk_index())) == HEADER_BYTES

    def chunk_index(self) -> np.ndarray:
        """Which header byte each block carries: (7 row + column) mod 36, which does not depend
        on the slice's width, so that a scan cut on its right or bottom still shows its header."""
        br, bc = np.divmod(np.arange(self.nby * self.nbx), self.nbx)
        return (_CHUNK_ROW_STEP * br + bc) % HEADER_BYTES

    def rows(self, br: int) -> tuple[int, int]:
        return br * self.block, (self.ny if br == self.nby - 1 else (br + 1) * self.block)

    def cols(self, bc: int) -> tuple[int, int]:
        return bc * self.block, (self.nx if bc == self.nbx - 1 else (bc + 1) * self.block)

    def tag_index(self) -> np.ndarray:
        """Flat in-slice indices (nby * nbx, 64) of every block's tag voxels."""
        b = self.block
        k = np.arange(TAG_VOXELS)
        ty = (np.arange(self.nby) * b)[:, None, None] + (k // b)[None, None, :]
        tx = (np.arange(self.nbx) * b)[None, :, None] + (k % b)[None, None, :]
        return (ty * self.nx + tx).reshape(-1, TAG_VOXELS)

    def edge_blocks(self) -> list[int]:
        """Blocks larger than block x block (last row / column when the size is not a multiple)."""
        rows = range(self.nby) if self.ny % self.block else []
        cols = range(self.nbx) if self.nx % self.block else []
        last_r, last_c = self.nby - 1, self.nbx - 1
        return sorted({last_r * self.nbx + c for c in cols} | {r * self.nbx + last_c for r in rows}
                      | ({last_r * self.nbx + last_c} if rows or cols else set()))

    def block_of_voxel(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.minimum(y // self.block, self.nby - 1),
                np.minimum(x // self.block, self.nbx - 1))


def check_block(block: int) -> None:
    if block not in BLOCK_SIZES:
        raise UsageError(f"block size {block}: must be {BLOCK_SIZES.start} to "
                         f"{BLOCK_SIZES.stop - 1}")


def check_grid(shape, block: int, what: str = "scan") -> Grid:
    check_block(block)
    g = Grid(block, int(shape[1]), int(shape[2]))
    if not g.fits:
        raise ScanFormatError(f"{what}: slices of {shape[1]} x {shape[2]} voxels are too small "
                              f"for the seal with {block} x {block} blocks (each slice carries "
                              f"the {HEADER_BYTES}-byte header, a byte a block)")
    return g


def _new_mac(key: bytes):
    """Keyed BLAKE2b, 56-bit output (RFC 7693 parameter block: key, digest length, personal)."""
    return hashlib.blake2b(key=key, digest_size=TAG_BITS // 8, person=_PERSON)


def _scan_binding(header: SealHeader) -> bytes:
    """What binds every block to its scan: the whole header (nonce, shape, block size)."""
    return header.pack()


def _mac_position(pos: np.ndarray) -> np.ndarray:
    """The (z, block row, block column) records every block's MAC covers."""
    return pos


class _Macs:
    """Per-block MACs of one scan: keyed BLAKE2b over (header, position, block voxels).
    _new_mac, _scan_binding and _mac_position are separate so that tests can weaken each one
    and show which forgery it stops (tests/test_seal.py)."""

    def __init__(self, key: bytes, header: SealHeader, grid: Grid):
        self.base = _new_mac(key)
        self.base.update(_scan_binding(header))
        self.grid = grid
        self.tag_idx = grid.tag_index()
        self.edges = grid.edge_blocks()
        b, nb = grid.block, grid.nby * grid.nbx
        self.rec = np.dtype([("pos", _POS), ("px", "<i2", (b * b,))])
        br, bc = np.divmod(np.arange(nb), grid.nbx)
        self.pos = np.zeros(nb, _POS)
        self.pos["row"], self.pos["col"] = br, bc

    def one(self, cleared: np.ndarray, z: int, br: int, bc: int) -> bytes:
        """The MAC of one block (any size) as bytes."""
        (y0, y1), (x0, x1) = self.grid.rows(br), self.grid.cols(bc)
        pos = np.zeros(1, _POS)
        pos["z"], pos["row"], pos["col"] = z, br, bc
        h = self.base.copy()
        h.update(_mac_position(pos).tobytes())
        h.update(np.ascontiguousarray(cleared[y0:y1, x0:x1], dtype="<i2").tobytes())
        return h.digest()

    def slice_tags(self, cleared: np.ndarray, z: int) -> np.ndarray:
        """(blocks, 7) tag bytes of slice z (`cleared`: the slice with tag-voxel LSBs cleared)."""
        g, b = self.grid, self.grid.block
        recs = np.empty(g.nby * g.nbx, self.rec)
        self.pos["z"] = z
        recs["pos"] = _mac_position(self.pos)
        tiles = cleared[:g.nby * b, :g.nbx * b].reshape(g.nby, b, g.nbx, b).swapaxes(1, 2)
        recs["px"] = tiles.reshape(-1, b * b)
        n, size, d = len(recs), self.rec.itemsize, TAG_BITS // 8
        mv, copy = memoryview(recs.tobytes()), self.base.copy

        def mac(i):
            h = copy()
            h.update(mv[i:i + size])
            return h.digest()

        out = bytearray(b"".join(map(mac, range(0, n * size, size))))
        for i in self.edges:  # the remainder rows/columns belong to the last block: MAC all of it
            out[i * d:(i + 1) * d] = self.one(cleared, z, *divmod(i, g.nbx))
        return np.frombuffer(bytes(out), np.uint8).reshape(n, d)


def _chunk_bits(header: SealHeader, grid: Grid) -> np.ndarray:
    """(blocks, 8) header bits every block of a slice carries."""
    raw = np.frombuffer(header.pack(), np.uint8)
    return np.unpackbits(raw[grid.chunk_index()][:, None], axis=1)


def _get_tags(chunk: np.ndarray, grid: Grid, idx: np.ndarray) -> np.ndarray:
    """(slices, blocks, 64) tag voxels of a (slices, ny, nx) chunk. With 8 x 8 blocks they are
    every voxel of the tiles: a reshape instead of a gather (several times faster)."""
    k, b, nby, nbx = len(chunk), grid.block, grid.nby, grid.nbx
    if b * b == TAG_VOXELS:
        t = chunk[:, :nby * b, :nbx * b].reshape(k, nby, b, nbx, b).transpose(0, 1, 3, 2, 4)
        return t.reshape(k, nby * nbx, TAG_VOXELS)
    return chunk.reshape(k, -1)[:, idx]


def _set_tags(chunk: np.ndarray, grid: Grid, idx: np.ndarray, values: np.ndarray) -> None:
    """Write _get_tags's layout back into the (C-contiguous) chunk."""
    k, b, nby, nbx = len(chunk), grid.block, grid.nby, grid.nbx
    if b * b == TAG_VOXELS:
        v = values.reshape(k, nby, nbx, b, b).transpose(0, 1, 3, 2, 4)
        chunk[:, :nby * b, :nbx * b] = v.reshape(k, nby * b, nbx * b)
    else:
        chunk.reshape(k, -1)[:, idx] = values


def _tiles(chunk: np.ndarray, grid: Grid) -> np.ndarray | None:
    """With 8 x 8 blocks, the (slices, rows, columns) view of the tiles, whose every voxel is a
    tag voxel, for in-place work; None for other block sizes."""
    b = grid.block
    return chunk[:, :grid.nby * b, :grid.nbx * b] if b * b == TAG_VOXELS else None


def _even_within(p: np.ndarray, x: np.ndarray | None, eps: int | None) -> np.ndarray:
    """The even value h (LSB cleared) to seal, so that h and h + 1 are both within x +- eps."""
    if x is None or eps is None:
        return p & np.int16(~1)  # int16: stays within -32768..32766
    h = p.astype(np.int32) & ~1
    x = x.astype(np.int32)
    h = np.where(h + 1 > x + eps, h - 2, h)
    h = np.where(h < x - eps, h + 2, h)
    return np.clip(h, -32768, 32766).astype(np.int16)


_WORKER: dict = {}
_SLICES_PER_JOB = 8
# Parallel only when it pays for starting the processes (~0.3 s each): about 40 512^2 slices.
_PARALLEL_BLOCKS = 150_000


def _worker_init(key: bytes, packed: bytes, block: int, ny: int, nx: int) -> None:
    _WORKER["macs"] = _Macs(key, SealHeader.unpack(packed), Grid(block, ny, nx))


def _worker_tags(job) -> np.ndarray:
    z0, cleared = job
    m = _WORKER["macs"]
    return np.stack([m.slice_tags(c, z0 + i) for i, c in enumerate(cleared)])


def default_workers(n_blocks: int) -> int:
    """Processes for the MACs: hashlib keeps the GIL on 136-byte inputs, so threads do not help."""
    if n_blocks < _PARALLEL_BLOCKS:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4))


def all_tags(cleared: np.ndarray, key: bytes, header: SealHeader, grid: Grid,
             workers: int | None = None) -> np.ndarray:
    """(z, blocks, 7) tag bytes of every block of `cleared` (tag-voxel LSBs cleared)."""
    nz = cleared.shape[0]
    if workers is None:
        workers = default_workers(nz * grid.nby * grid.nbx)
    jobs = [(z0, cleared[z0:z0 + _SLICES_PER_JOB]) for z0 in range(0, nz, _SLICES_PER_JOB)]
    if workers <= 1 or len(jobs) < 2:
        _worker_init(key, header.pack(), grid.block, grid.ny, grid.nx)
        try:
            return np.concatenate([_worker_tags(j) for j in jobs])
        finally:
            _WORKER.clear()
    # spawn, not fork: the caller may hold torch / BLAS threads, which a fork would copy mid-lock.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_worker_init,
                             initargs=(key, header.pack(), grid.block, grid.ny, grid.nx)) as ex:
        return np.concatenate(list(ex.map(_worker_tags, jobs)))


def seal_volume(hu: np.ndarray, key: bytes, *, block: int = DEFAULT_BLOCK,
                reference: np.ndarray | None = None, eps: float | None = None,
                nonce: bytes | None = None, workers: int | None = None) -> np.ndarray:
    """The sealed int16 copy of `hu` (integer HU, z, y, x).

    Each voxel changes by at most 1. With `reference` (the unperturbed scan) and `eps` (>= 1),
    the sealed value stays within reference +- floor(eps) wherever `hu` already was."""
    a = np.asarray(hu)
    if a.dtype != np.int16:
        if not np.issubdtype(a.dtype, np.integer) and not np.array_equal(a, np.round(a)):
            raise UsageError("the seal needs integer HU (round the scan first)")
        a = stored_as(a, np.int16)
    grid = check_grid(a.shape, block, "scan to seal")
    e = None
    if reference is not None and eps is not None:
        e = int(np.floor(eps))
        if e < 1:
            raise UsageError(f"--eps {eps:g}: the seal changes a voxel by 1 HU, "
                             f"so --eps must be >= 1")
        reference = np.asarray(reference)
    header = SealHeader(block, tuple(int(s) for s in a.shape), nonce or secrets.token_bytes(16))
    idx = grid.tag_index()
    out = np.ascontiguousarray(a).copy()
    for z0 in range(0, a.shape[0], 32):  # bounded temporaries
        c = out[z0:z0 + 32]
        if e is None and (tiles := _tiles(c, grid)) is not None:
            tiles &= np.int16(~1)
            continue
        ref = None if e is None else _get_tags(reference[z0:z0 + 32], grid, idx)
        _set_tags(c, grid, idx, _even_within(_get_tags(c, grid, idx), ref, e))
    tags = all_tags(out, key, header, grid, workers)
    chunk = _chunk_bits(header, grid)
    for z0 in range(0, a.shape[0], 32):
        c = out[z0:z0 + 32]
        t = np.unpackbits(tags[z0:z0 + 32], axis=2)
        bits = np.concatenate([t, np.broadcast_to(chunk, t.shape[:2] + (CHUNK_BITS,))], axis=2)
        if (tiles := _tiles(c, grid)) is not None:
            k, nby, nbx = len(c), grid.nby, grid.nbx
            tiles |= bits.reshape(k, nby, nbx, 8, 8).transpose(0, 1, 3, 2, 4).reshape(tiles.shape)
        else:
            _set_tags(c, grid, idx, _get_tags(c, grid, idx) | bits)
    return out


@dataclass
class Verification:
    """What verify_volume found. `failed` is the (z, block row, block column) grid of blocks
    whose MAC or header byte does not match."""
    header: SealHeader
    shape: tuple[int, int, int]
    grid: Grid
    failed: np.ndarray
    moved: dict[int, int]          # slice -> the sealed slice it holds (when not itself)
    cut: tuple[int, int, int] | None = None   # a scan cut on the left or top: where its voxel
    #                                           (0, 0, 0) was in the sealed scan (seal_crop.py)

    @property
    def cropped(self) -> bool:
        return tuple(self.shape) != tuple(self.header.shape)

    @property
    def intact(self) -> bool:
        return not self.failed.any() and not self.cropped


def _lsb(a: np.ndarray) -> np.ndarray:
    return (a & 1).astype(np.uint8)


def header_bytes(hu: np.ndarray, block: int) -> np.ndarray | None:
    """The 36 header bytes the LSBs carry on a `block` grid (majority vote over every block)."""
    grid = Grid(block, hu.shape[1], hu.shape[2])
    if not grid.fits:
        return None
    idx = grid.tag_index()[:, TAG_BITS:]                      # (blocks, 8)
    flat = hu.reshape(hu.shape[0], -1)
    votes = np.zeros((HEADER_BYTES, CHUNK_BITS), np.int64)
    counts = np.zeros(HEADER_BYTES, np.int64)
    j = grid.chunk_index()
    for z0 in range(0, hu.shape[0], 32):
        bits = _lsb(flat[z0:z0 + 32][:, idx]).sum(axis=0)    # (blocks, 8)
        np.add.at(votes, j, bits)
        np.add.at(counts, j, min(32, hu.shape[0] - z0))
    return np.packbits((2 * votes > counts[:, None]).astype(np.uint8), axis=1).ravel()


def read_header(hu: np.ndarray, block: int) -> SealHeader | None:
    raw = header_bytes(hu, block)
    h = None if raw is None else SealHeader.unpack(raw.tobytes())
    return h if h is not None and h.block == block else None


def find_header(hu: np.ndarray, block: int | None) -> SealHeader:
    """The seal header: on the given block size, or the first block size that carries one."""
    if not np.issubdtype(hu.dtype, np.integer):
        raise NoSealError("no seal: the scan is not integer HU (a sealed scan is)")
    if block is not None:
        check_block(block)
        h = read_header(hu, block)
        if h is not None:
            return h
    for b in BLOCK_SIZES:
        if b != block and (h := read_header(hu, b)) is not None:
            if block is not None:
                raise BlockSizeError(f"the seal uses blocks of {b} x {b}, not {block} x {block} "
                                     f"(leave out --block-size to use the seal's own)")
            return h
    raise NoSealError("no seal: the pixels carry no seal header (not sealed, or re-encoded "
                      "lossily)")


def _identify_slices(hu, macs: _Macs, failed: np.ndarray, header: SealHeader) -> dict[int, int]:
    """For every wholly failing slice, the sealed slice it is (when it is one moved elsewhere):
    its first block is tried at every sealed slice position."""
    moved = {}
    idx = macs.tag_idx[0]
    for z in np.flatnonzero(failed.reshape(len(failed), -1).all(axis=1)):
        s = hu[z].astype(np.int16).ravel().copy()
        tag = np.packbits(_lsb(s[idx])[:TAG_BITS]).tobytes()
        s[idx] &= ~1
        cleared = s.reshape(hu.shape[1:])
        for zz in range(header.shape[0]):
            if zz != z and macs.one(cleared, zz, 0, 0) == tag:
                moved[int(z)] = zz
                break
    return moved


def verify_volume(hu: np.ndarray, key: bytes, *, block: int | None = None,
                  workers: int | None = None) -> Verification:
    """Check every block of `hu` (the scan as read, integer HU). Raises NoSealError,
    BlockSizeError, or WrongKeyError when a header is there but no block verifies."""
    hu = np.asarray(hu)
    try:
        header = find_header(hu, block)
    except NoSealError:
        if not np.issubdtype(hu.dtype, np.integer):
            raise
        from procedures.protection.seal_crop import verify_cut  # rare: a scan cut on the left/top
        v = verify_cut(hu, key, block or DEFAULT_BLOCK)
        if v is None:
            raise
        return v
    grid = Grid(header.block, hu.shape[1], hu.shape[2])
    idx = grid.tag_index()
    cleared = np.ascontiguousarray(hu, dtype=np.int16).copy()
    bits = np.empty((hu.shape[0],) + idx.shape, np.uint8)
    for z0 in range(0, hu.shape[0], 32):
        c = cleared[z0:z0 + 32]
        if (tiles := _tiles(c, grid)) is not None:
            bits[z0:z0 + 32] = _get_tags((tiles & 1).astype(np.uint8), grid, idx)
            tiles &= np.int16(~1)
            continue
        t = _get_tags(c, grid, idx)
        bits[z0:z0 + 32] = t & 1
        _set_tags(c, grid, idx, t & ~1)
    tags = all_tags(cleared, key, header, grid, workers)
    ok = (tags == np.packbits(bits[:, :, :TAG_BITS], axis=2)).all(axis=2)
    ok &= (bits[:, :, TAG_BITS:] == _chunk_bits(header, grid)[None]).all(axis=2)
    failed = ~ok.reshape(hu.shape[0], grid.nby, grid.nbx)
    moved = _identify_slices(hu, _Macs(key, header, grid), failed, header) if failed.any() else {}
    if failed.all() and not moved:
        raise WrongKeyError("the scan is sealed, but with another key (no block verifies with this "
                            "one), or every block was changed")
    return Verification(header, tuple(int(s) for s in hu.shape), grid, failed, moved)


def changed_blocks(a: np.ndarray, b: np.ndarray, block: int) -> np.ndarray:
    """(z, block row, block column) grid of the blocks in which any voxel of a and b differs:
    the truth a tamper map is measured against."""
    grid = Grid(block, a.shape[1], a.shape[2])
    z, y, x = np.nonzero(np.asarray(a) != np.asarray(b))
    out = np.zeros((a.shape[0], grid.nby, grid.nbx), bool)
    by, bx = grid.block_of_voxel(y, x)
    out[z, by, bx] = True
    return out
