"""Property-based tests (hypothesis) of the geometry helpers every tamper and export relies on:
utils.cubes.cut_cube / paste_cube (CT-GAN's conventions, padding outside the volume) and
utils.scan_io.world2vox / vox2world (any orthonormal direction, any positive spacing)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from utils.cubes import cube_bounds, cut_cube, paste_cube
from utils.scan_io import Scan, vox2world, world2vox

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

vol_shapes = st.tuples(*(st.integers(1, 12) for _ in range(3)))
cube_shapes = st.tuples(*(st.integers(1, 9) for _ in range(3)))


@st.composite
def volume_cube_centre(draw):
    """A volume, a cube shape and a centre anywhere from far outside to far inside (floats too:
    the centre is truncated like CT-GAN's cutCube)."""
    shape = draw(vol_shapes)
    vol = draw(arrays(np.int16, shape, elements=st.integers(-1024, 3071)))
    cshape = draw(cube_shapes)
    centre = tuple(draw(st.one_of(st.integers(-12, s + 12),
                                  st.floats(-12, s + 12, allow_nan=False, allow_infinity=False)))
                   for s in shape)
    return vol, cshape, centre


def _reference_cut(vol, centre, shape, pad):
    """Voxel-by-voxel definition: out[i] = vol[start + i] inside, pad outside."""
    c = np.trunc(np.asarray(centre, dtype=np.float64)).astype(np.int64)
    start = c - np.round(np.asarray(shape) / 2).astype(np.int64)
    out = np.full(shape, pad, dtype=vol.dtype)
    for idx in np.ndindex(*shape):
        src = start + np.asarray(idx)
        if np.all(src >= 0) and np.all(src < vol.shape):
            out[idx] = vol[tuple(src)]
    return out


@SETTINGS
@given(volume_cube_centre(), st.sampled_from([-1000, 0, 7]))
def test_cut_cube_is_the_voxelwise_definition(args, pad):
    vol, shape, centre = args
    got = cut_cube(vol, centre, shape, pad)
    assert got.shape == shape and got.dtype == vol.dtype
    np.testing.assert_array_equal(got, _reference_cut(vol, centre, shape, pad))


@SETTINGS
@given(volume_cube_centre())
def test_cut_then_paste_round_trip(args):
    """Pasting back what was cut leaves the volume unchanged, wherever the cube is; the slices
    returned are exactly the part of the cube inside the volume."""
    vol, shape, centre = args
    cube = cut_cube(vol, centre, shape, pad_value=-1000)
    work = vol.copy()
    written = paste_cube(work, cube, centre)
    np.testing.assert_array_equal(work, vol)
    _, _, a, b = cube_bounds(centre, shape, vol.shape)
    inside = int(np.prod(np.maximum(b - a, 0)))
    assert work[written].size == inside


@SETTINGS
@given(volume_cube_centre(), st.integers(-500, 500))
def test_paste_changes_only_the_cube_inside_the_volume(args, value):
    vol, shape, centre = args
    work = vol.astype(np.int32)
    cube = np.full(shape, value + 10000, dtype=np.int32)  # a value the volume never holds
    written = paste_cube(work, cube, centre)
    changed = work != vol
    mask = np.zeros(vol.shape, bool)
    mask[written] = True
    np.testing.assert_array_equal(changed, mask)
    # ... and cutting at the same place reads the pasted values back, padding elsewhere.
    back = cut_cube(work, centre, shape, pad_value=-1)
    assert set(np.unique(back)) <= {value + 10000, -1}
    assert (back == value + 10000).sum() == mask.sum()


@SETTINGS
@given(vol_shapes, cube_shapes)
def test_cube_far_outside_is_all_padding_and_paste_is_a_no_op(vshape, cshape):
    vol = np.arange(np.prod(vshape), dtype=np.int16).reshape(vshape)
    for centre in ((-20, 0, 0), (0, vshape[1] + 20, 0), (0, 0, vshape[2] + 25)):
        assert (cut_cube(vol, centre, cshape, pad_value=-1000) == -1000).all()
        work = vol.copy()
        written = paste_cube(work, np.zeros(cshape, np.int16), centre)
        assert work[written].size == 0
        np.testing.assert_array_equal(work, vol)


# --- world <-> voxel --------------------------------------------------------------------------
@st.composite
def geometries(draw):
    """Spacing (0.1-10 mm, z up to 10), origin (+-500 mm), and an orthonormal direction matrix of
    either handedness (QR of a random matrix, columns signed at random)."""
    spacing = np.array([draw(st.floats(0.1, 10.0)) for _ in range(3)])
    origin = np.array([draw(st.floats(-500, 500)) for _ in range(3)])
    m = np.array([[draw(st.floats(-1, 1)) for _ in range(3)] for _ in range(3)])
    assume(abs(np.linalg.det(m)) > 1e-2)
    q, r = np.linalg.qr(m)
    q = q * np.sign(np.diag(r))
    if draw(st.booleans()):
        q[:, 0] = -q[:, 0]
    return spacing, origin, q


@SETTINGS
@given(geometries(), st.tuples(*(st.integers(1, 600) for _ in range(3))), st.data())
def test_world2vox_inverts_vox2world(geo, shape, data):
    spacing, origin, direction = geo
    # Edge voxels (corners of the grid) and random interior points, one and many at a time.
    corners = np.array([[z, y, x] for z in (0, shape[0] - 1) for y in (0, shape[1] - 1)
                        for x in (0, shape[2] - 1)], dtype=np.float64)
    pts = np.array([[data.draw(st.floats(-0.5, s - 0.5)) for s in shape] for _ in range(4)])
    vox = np.vstack([corners, pts])
    w = vox2world(vox, spacing, origin, direction)
    back = world2vox(w, spacing, origin, direction)
    np.testing.assert_allclose(back, vox, atol=1e-6 * max(shape))
    np.testing.assert_allclose(world2vox(w[0], spacing, origin, direction), vox[0], atol=1e-6 * max(shape))
    # The voxel (0, 0, 0) is the origin; unit steps along an index axis have the length of its spacing.
    np.testing.assert_allclose(vox2world((0, 0, 0), spacing, origin, direction), origin, atol=1e-9)
    for ax in range(3):
        step = np.zeros(3)
        step[ax] = 1
        d = vox2world(step, spacing, origin, direction) - origin
        assert np.linalg.norm(d) == pytest.approx(spacing[ax], rel=1e-9)


@SETTINGS
@given(geometries(), st.lists(st.tuples(*(st.floats(-1000, 1000) for _ in range(3))), min_size=1, max_size=5))
def test_vox2world_inverts_world2vox_and_scan_methods_agree(geo, worlds):
    spacing, origin, direction = geo
    w = np.array(worlds, dtype=np.float64)
    v = world2vox(w, spacing, origin, direction)
    np.testing.assert_allclose(vox2world(v, spacing, origin, direction), w, atol=1e-6)
    scan = Scan(hu=np.zeros((2, 2, 2), np.int16), spacing=spacing, origin=origin, direction=direction)
    np.testing.assert_allclose(scan.world2vox(w), v, atol=1e-9)
    np.testing.assert_allclose(scan.vox2world(v), vox2world(v, spacing, origin, direction), atol=1e-9)
