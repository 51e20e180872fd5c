"""The seal (docs/seal.md): every forgery is found and located, and each is missed by a seal
weakened in the one way that forgery exploits; the bound on the change; the verdicts."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_phantom
from procedures.protection import seal as S
from procedures.protection.seal import (HEADER_BYTES, TAG_BITS, Grid, SealHeader, changed_blocks,
                                        seal_volume, verify_volume)
from utils.errors import BlockSizeError, NoSealError, WrongKeyError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SHAPE = (8, 64, 72)   # 8 x 9 blocks of 8 x 8 per slice


@pytest.fixture(scope="module")
def scan() -> np.ndarray:
    return make_phantom(SHAPE, seed=3)


@pytest.fixture(scope="module")
def sealed(scan) -> np.ndarray:
    return seal_volume(scan, KEY, nonce=b"\x01" * 16)


def _flagged(hu, key=KEY) -> np.ndarray:
    return verify_volume(hu, key).failed


def _weaken(monkeypatch, what: str) -> None:
    if what == "key":      # the MAC without a secret: anyone can compute the tags
        real = S._new_mac
        monkeypatch.setattr(S, "_new_mac", lambda key: real(b"public algorithm, no key"))
    elif what == "position":
        monkeypatch.setattr(S, "_mac_position", lambda pos: np.zeros_like(pos))
    elif what == "binding":  # no nonce, shape or block size in the MAC
        monkeypatch.setattr(S, "_scan_binding", lambda header: b"")


def _forge_tags(hu: np.ndarray, key: bytes, header: SealHeader, blocks=None) -> np.ndarray:
    """What an attacker who knows the algorithm but not the key does: recompute the tags of
    `blocks` (default all) with a key of their own and write them into the LSBs."""
    g = Grid(header.block, *hu.shape[1:])
    if blocks is not None:
        by, bx = g.block_of_voxel(np.arange(hu.shape[1]), np.arange(hu.shape[2]))
        mask = blocks[:, by[:, None], bx[None, :]]
        return np.where(mask, _forge_tags(hu, key, header), hu)
    idx = g.tag_index()
    out = hu.copy()
    flat = out.reshape(hu.shape[0], -1)
    flat[:, idx] &= ~1
    tags = np.unpackbits(S.all_tags(out, key, header, g, workers=1), axis=2)
    chunk = np.broadcast_to(S._chunk_bits(header, g), tags.shape[:2] + (8,))
    flat[:, idx] |= np.concatenate([tags, chunk], axis=2)
    return out


# --- bound and round trip ------------------------------------------------------------------------
def test_seal_changes_each_voxel_by_at_most_one_and_verifies(scan, sealed):
    assert sealed.dtype == np.int16
    assert np.abs(sealed.astype(np.int32) - scan).max() == 1
    v = verify_volume(sealed, KEY)
    assert v.intact and not v.failed.any() and v.header.shape == SHAPE


@pytest.mark.parametrize("eps", [1, 3, 10])
def test_perturbation_plus_seal_stays_within_eps(scan, eps):
    rng = np.random.default_rng(eps)
    d = rng.choice([-eps, eps], size=scan.shape)          # the worst case: every voxel at +-eps
    d[rng.random(scan.shape) < 0.3] = 0
    perturbed = (scan.astype(np.int32) + d).astype(np.int16)
    out = seal_volume(perturbed, KEY, reference=scan, eps=eps)
    assert np.abs(out.astype(np.int32) - scan).max() <= eps
    assert verify_volume(out, KEY).intact


def test_int16_extremes_stay_in_range():
    hu = np.full(SHAPE, 32767, np.int16)
    hu[::2] = -32768
    out = seal_volume(hu, KEY)
    assert verify_volume(out, KEY).intact
    assert np.abs(out.astype(np.int32) - hu).max() <= 1


def test_ragged_slices_cover_the_remainder(scan):
    """Rows and columns past the last full block belong to the last block: a change there is
    found too."""
    hu = make_phantom((4, 70, 77), seed=1)
    s = seal_volume(hu, KEY)
    assert verify_volume(s, KEY).intact
    t = s.copy()
    t[2, 69, 76] += 2          # the last voxel: remainder row and column
    f = _flagged(t)
    assert f.sum() == 1 and f[2, -1, -1]


# --- forgeries: found and located, and missed by the weakened seal -------------------------------
def test_content_change_with_recomputed_tags(monkeypatch, sealed):
    header = verify_volume(sealed, KEY).header
    t = sealed.copy()
    t[3, 20:30, 30:45] += 40                             # an injected "nodule"
    blocks = changed_blocks(sealed, t, 8)
    forged = _forge_tags(t, OTHER_KEY, header, blocks)
    truth = changed_blocks(sealed, forged, 8)
    assert np.array_equal(_flagged(forged), truth) and truth.sum() == 6
    _weaken(monkeypatch, "key")
    s = seal_volume(make_phantom(SHAPE, seed=3), KEY)
    t = s.copy()
    t[3, 20:30, 30:45] += 40
    forged_weak = _forge_tags(t, OTHER_KEY, verify_volume(s, KEY).header, blocks)
    assert not _flagged(forged_weak).any()               # without a key the forgery passes


def test_rewriting_the_embedded_bits(monkeypatch, sealed):
    """The LSB plane alone rewritten (content kept), as an attacker computes it without the key."""
    header = verify_volume(sealed, KEY).header
    region = (slice(5, 6), slice(8, 24), slice(16, 40))
    forged = sealed.copy()
    forged[region] = _forge_tags(sealed, OTHER_KEY, header)[region]
    truth = changed_blocks(sealed, forged, 8)
    assert truth.any() and np.array_equal(_flagged(forged), truth)
    _weaken(monkeypatch, "key")
    s = seal_volume(make_phantom(SHAPE, seed=3), KEY)
    forged = s.copy()
    forged[region] = _forge_tags(s, OTHER_KEY, verify_volume(s, KEY).header)[region]
    assert not _flagged(forged).any()


def test_flipped_lsb_is_found_in_its_block(sealed):
    t = sealed.copy()
    t[6, 41, 13] ^= 1
    f = _flagged(t)
    assert f.sum() == 1 and f[6, 41 // 8, 13 // 8]


def test_copy_from_another_position(monkeypatch, sealed):
    """Blocks (LSBs and all) copied over other blocks of the same scan: a cut-and-paste forgery.
    The first two keep their header byte (same place in another slice; a block of the
    same slice where 7 x row + column is equal mod 36), so only the position in the MAC tells
    them apart."""
    def forge(s):
        t = s.copy()
        t[2, 16:32, 40:56] = s[5, 16:32, 40:56]          # another slice, same place
        t[4, 0:8, 56:64] = s[4, 8:16, 0:8]               # the same slice, 1 row down, 7 left
        t[6, 0:8, 0:8] = s[6, 8:16, 1:9]                  # one block row down, one voxel across
        return t
    t = forge(sealed)
    truth = changed_blocks(sealed, t, 8)
    assert truth.sum() == 6 and np.array_equal(_flagged(t), truth)
    _weaken(monkeypatch, "position")
    s = seal_volume(make_phantom(SHAPE, seed=3), KEY)
    weak = _flagged(forge(s))
    assert not weak[2].any() and not weak[4].any()       # the two same-header-byte copies pass


def test_collage_from_another_sealed_scan(monkeypatch, scan):
    """Blocks of a second scan, sealed with the same key, pasted in. The pasted blocks carry
    header bytes 0-19 (magic, sizes): those are the same in both scans, so only the nonce
    in the MAC tells them apart."""
    other = make_phantom(SHAPE, seed=9)

    def forge(a, b):
        t = a.copy()
        t[3, 0:16, 0:72] = b[3, 0:16, 0:72]              # blocks 0-17 of the slice
        return t
    a, b = seal_volume(scan, KEY), seal_volume(other, KEY)
    t = forge(a, b)
    truth = changed_blocks(a, t, 8)
    assert truth.sum() == 18 and np.array_equal(_flagged(t), truth)
    _weaken(monkeypatch, "binding")
    a, b = seal_volume(scan, KEY), seal_volume(other, KEY)
    assert not _flagged(forge(a, b)).any()


def test_swapped_and_reordered_slices(monkeypatch, sealed):
    order = [0, 1, 4, 3, 2, 6, 7, 5]                      # a swap and a rotation
    v = verify_volume(sealed[order], KEY)
    moved = [z for z in range(len(order)) if order[z] != z]
    assert np.array_equal(np.flatnonzero(v.failed.any(axis=(1, 2))), moved)
    assert v.failed[moved].all()
    assert v.moved == {z: order[z] for z in moved}       # which sealed slice each one is
    _weaken(monkeypatch, "position")
    s = seal_volume(make_phantom(SHAPE, seed=3), KEY)
    assert not _flagged(s[order]).any()


def test_deleted_slice(monkeypatch, sealed):
    t = np.delete(sealed, 3, axis=0)
    v = verify_volume(t, KEY)
    assert not v.intact and v.cropped and v.header.shape == SHAPE
    assert not v.failed[:3].any() and v.failed[3:].all()   # every slice after the gap moved
    assert v.moved == {z: z + 1 for z in range(3, 7)}
    _weaken(monkeypatch, "position")
    s = seal_volume(make_phantom(SHAPE, seed=3), KEY)
    assert not _flagged(np.delete(s, 3, axis=0)).any()     # the map would show nothing


def test_inserted_slice(monkeypatch, sealed):
    t = np.insert(sealed, 5, sealed[2], axis=0)           # a sealed slice, duplicated
    v = verify_volume(t, KEY)
    assert v.cropped and not v.failed[:5].any() and v.failed[5:].all()
    assert v.moved[5] == 2
    _weaken(monkeypatch, "position")
    s = seal_volume(make_phantom(SHAPE, seed=3), KEY)
    assert not _flagged(np.insert(s, 5, s[2], axis=0)).any()


def test_cropping_is_reported_with_the_sealed_shape(sealed):
    v = verify_volume(sealed[2:, :, :64], KEY)     # top slices and the last column of blocks
    assert v.cropped and not v.intact and v.header.shape == SHAPE
    assert v.moved == {z: z + 2 for z in range(6)}


def test_cropping_with_a_rewritten_header(monkeypatch, sealed):
    """A crop whose embedded header is rewritten to claim the new shape: the header is in every
    block's MAC, so nothing verifies; without it in the MAC the crop would pass."""
    def forge(s, key):
        t = s[:, :56, :].copy()                           # the last block row cut off
        h = verify_volume(s, key).header
        fake = SealHeader(h.block, t.shape, h.nonce)
        g = Grid(8, *t.shape[1:])
        flat = t.reshape(t.shape[0], -1)
        idx = g.tag_index()[:, TAG_BITS:]
        flat[:, idx] = (flat[:, idx] & ~1) | S._chunk_bits(fake, g)[None]
        return t
    with pytest.raises(WrongKeyError):
        verify_volume(forge(sealed, KEY), KEY)
    _weaken(monkeypatch, "binding")
    s = seal_volume(make_phantom(SHAPE, seed=3), KEY)
    assert verify_volume(forge(s, KEY), KEY).intact


# --- verdicts ------------------------------------------------------------------------------------
def test_wrong_key_no_seal_and_block_size(scan, sealed):
    with pytest.raises(WrongKeyError):
        verify_volume(sealed, OTHER_KEY)
    with pytest.raises(NoSealError):
        verify_volume(scan, KEY)
    with pytest.raises(NoSealError):
        verify_volume(sealed.astype(np.float32) + 0.25, KEY)
    with pytest.raises(BlockSizeError):
        verify_volume(sealed, KEY, block=16)
    s16 = seal_volume(make_phantom((3, 128, 128)), KEY, block=16)
    assert verify_volume(s16, KEY).header.block == 16
    with pytest.raises(BlockSizeError):
        verify_volume(s16, KEY, block=8)


def test_header_survives_tampering_of_most_blocks(sealed):
    """The header is read by majority over every block: a tamper over a third of the slices
    leaves it readable, and the map still exact."""
    t = sealed.copy()
    t[:3, :, :40] += 100
    assert np.array_equal(_flagged(t), changed_blocks(sealed, t, 8))


def test_header_layout():
    assert HEADER_BYTES == 36 and len(SealHeader(8, (1, 2, 3), b"n" * 16).pack()) == HEADER_BYTES
    with pytest.raises(Exception, match="too small"):
        seal_volume(np.zeros((2, 40, 40), np.int16), KEY)   # 25 blocks < the 36 header bytes


def test_parallel_tags_equal_serial(sealed):
    h = verify_volume(sealed, KEY).header
    g = Grid(8, *SHAPE[1:])
    assert np.array_equal(S.all_tags(sealed, KEY, h, g, workers=1),
                          S.all_tags(sealed, KEY, h, g, workers=2))


def test_report_names_moved_slices_in_runs(sealed):
    from procedures.protection.seal_report import summary_lines, tamper_regions
    from utils.scan import Scan

    t = np.concatenate([sealed[2:], sealed[:1]])          # cut the top two, one moved to the end
    v = verify_volume(t, KEY)
    lines = summary_lines(v, tamper_regions(v, Scan(t, (2.5, 0.7, 0.7), (0, 0, 0))))
    assert lines[0].startswith("tampered: 1 region(s)")
    assert "the seal was made on a 8 x 64 x 72 scan; this one is 7 x 64 x 72" in lines[1]
    assert "slices 0-5 hold sealed slices 2-7 (moved)" in lines
    assert "slice 6 holds sealed slice 0 (moved)" in lines


@pytest.mark.parametrize("cut", [(0, 3, 5), (2, 16, 0), (1, 21, 13)])
def test_a_cut_on_the_left_or_top_is_found_and_located(cut):
    """The block grid shifted: the header is found at the shifted grid and the cut located."""
    hu = seal_volume(make_phantom((6, 128, 120), seed=2), KEY)
    z, y, x = cut
    v = verify_volume(hu[z:, y:, x:], KEY)
    assert not v.intact and v.cropped and v.header.shape == (6, 128, 120)
    assert v.cut == cut and v.failed.all()
