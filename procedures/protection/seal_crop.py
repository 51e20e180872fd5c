"""A sealed scan cut on the left or top (docs/seal.md#the-verdict): the block grid no longer starts
at voxel (0, 0), so procedures.protection.seal finds no header there. This module looks for the
header at every pixel offset of the grid and every rotation of the header bytes, then finds
where the cut scan lay in the sealed one by trying its first block's MAC at the sealed
positions that the rotation allows. The verdict is tampered, every block flagged, and the cut
located when a block verifies."""
from __future__ import annotations

import numpy as np

from procedures.protection import seal as S


def find_cut(hu: np.ndarray, block: int):
    """(header, row offset, column offset, rotation) of a header on a shifted grid, or None."""
    sub = hu[:min(len(hu), 8)]
    for py in range(block):
        for px in range(block):
            if sub.shape[1] - py < block or sub.shape[2] - px < block:
                continue
            raw = S.header_bytes(sub[:, py:, px:], block)
            if raw is None:
                continue
            for rot in range(py == px == 0, S.HEADER_BYTES):  # (0, 0, 0): find_header's
                h = S.SealHeader.unpack(np.roll(raw, rot).tobytes())
                if h is not None and h.block == block:
                    return h, py, px, rot
    return None


def _tile_mac(base, tile: np.ndarray, z: int, br: int, bc: int) -> bytes:
    pos = np.zeros(1, S._POS)
    pos["z"], pos["row"], pos["col"] = z, br, bc
    h = base.copy()
    h.update(S._mac_position(pos).tobytes())
    h.update(np.ascontiguousarray(tile, dtype="<i2").tobytes())
    return h.digest()


def locate_cut(hu, key: bytes, h: S.SealHeader, py: int, px: int, rot: int):
    """Where voxel (0, 0, 0) of `hu` was in the sealed scan, from the MAC of one whole block
    (tried on the first three slices), or None."""
    b = h.block
    sealed = S.Grid(b, *h.shape[1:])
    base = S._new_mac(key)
    base.update(S._scan_binding(h))
    for z in range(min(3, len(hu))):
        tile = hu[z, py:py + b, px:px + b].astype(np.int16).ravel()
        tag = np.packbits((tile[:S.TAG_VOXELS] & 1)[:S.TAG_BITS].astype(np.uint8)).tobytes()
        tile[:S.TAG_VOXELS] &= ~1
        tile = tile.reshape(b, b)
        for zz in range(h.shape[0]):
            for br in range(sealed.nby - 1):      # the last row and column hold larger blocks
                first = (rot - S._CHUNK_ROW_STEP * br) % S.HEADER_BYTES
                for bc in range(first, sealed.nbx - 1, S.HEADER_BYTES):
                    if _tile_mac(base, tile, zz, br, bc) == tag:
                        return zz - z, br * b - py, bc * b - px
    return None


def verify_cut(hu: np.ndarray, key: bytes, block: int) -> S.Verification | None:
    """A Verification of a scan cut on the left or top (all blocks flagged), or None."""
    found = find_cut(hu, block)
    if found is None:
        return None
    h, py, px, rot = found
    grid = S.Grid(block, hu.shape[1], hu.shape[2])
    failed = np.ones((hu.shape[0], max(grid.nby, 1), max(grid.nbx, 1)), bool)
    return S.Verification(h, tuple(int(s) for s in hu.shape), grid, failed, {},
                          cut=locate_cut(hu, key, h, py, px, rot))
