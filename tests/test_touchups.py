"""Step 8 of CT-GAN's attack (procedures.attacker.touchups) in NumPy and torch, and inside the
differentiable attack (procedures.attacker.port, touchups="copy"): equal to the Keras pipeline
on tiny random generators, and a gradient that reaches the scan through the copied noise block."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_phantom
from procedures.attacker import touchups as T
from procedures.attacker.port import DifferentiableTamper

SPACING = (2.5, 0.7, 0.7)
# The tolerance of tests/test_attack_torch.py (the same float32 generators, summed in another
# order by Keras and the port; everything else float64 in both).
MAX_HU, Q999_HU = 2.0, 0.05


def _vol(shape=(60, 96, 96), seed=1):
    return make_phantom(shape, seed=seed).astype(np.float32)


@pytest.mark.parametrize("action", ["inject", "remove"])
def test_numpy_and_torch_give_the_same_touch_ups(action):
    rng = np.random.default_rng(0)
    mal, ben = rng.normal(-500, 400, (2, 9, 9, 9))
    block = rng.normal(-700, 300, (9, 9, 9))
    k = T.kernel(9, action)
    want = T.blend(mal, ben, T.noise_from_block(block), k, action)
    noise = T.noise_from_block(torch.from_numpy(block))
    got = T.blend(torch.from_numpy(mal), torch.from_numpy(ben), noise, torch.from_numpy(k.copy()),
                  action)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)
    if action == "inject":  # the nodule only adds density
        assert np.all(want >= ben)
    assert not np.any(T.noise_from_block(np.zeros((4, 4, 4))))      # no lung voxel: no noise


def test_overlay_takes_the_shared_voxels_inside_the_volume():
    block, src = np.zeros((4, 4, 4)), np.ones((4, 4, 4))
    out = T.overlay(block, (0, 0, 0), src, (2, 2, -2), (10, 10, 10))
    assert out[2:, 2:, :2].all() and out.sum() == 2 * 2 * 2 and not block.any()


@pytest.fixture(scope="module")
def step8(tiny_ctgan_models):
    return DifferentiableTamper.from_model_dirs(
        tiny_ctgan_models / "INJ", tiny_ctgan_models / "REM", resample="spline", clamp="plain",
        work_dtype=torch.float64, touchups="copy")


@pytest.mark.tf
@pytest.mark.parametrize("action", ["inject", "remove"])
@pytest.mark.parametrize("center", [(30, 48, 66),      # right lung, inside
                                    (2, 10, 90),       # both cubes leave the scan
                                    (30, 41, 26)])     # the copy-noise block meets the tamper
def test_port_with_step8_equals_the_keras_pipeline(step8, tiny_ctgan_models, action, center):
    from procedures.attacker.pipeline import ScanManipulator

    hu = _vol()
    a = hu.copy()
    sa = ScanManipulator(tiny_ctgan_models).tamper_volume(a, SPACING, center, action)
    with torch.no_grad():
        b = step8(torch.from_numpy(hu), SPACING, center, action).numpy()
    changed = a != hu
    assert changed.sum() > 1000
    assert np.all(b[~changed & (b != hu)] == a[~changed & (b != hu)])  # nothing else moved
    diff = np.abs(a.astype(np.float64) - b)
    assert diff.max() <= MAX_HU and np.quantile(diff[sa], 0.999) <= Q999_HU, diff.max()
    steps17 = step8.footprints(torch.from_numpy(hu), SPACING, center, action)[0]
    assert steps17[1] != sa                             # step 8 reaches beyond the cube


def test_gradient_reaches_the_scan_through_the_copied_block(tiny_ctgan_models):
    """A lung voxel of the copy-noise block, far from the attacked cube, moves the tampered cube
    with step 8 in the graph and not without it."""
    hu = _vol((40, 160, 160), seed=2)
    center = (20, 80, 130)                    # reference cube x in [100, 159]
    dims = hu.shape
    sdim = DifferentiableTamper.ref_side(SPACING)
    nb = T.noise_block_center(dims)
    lo = nb - np.round(sdim / 2).astype(int)
    box = np.zeros(dims, bool)
    box[lo[0]:lo[0] + sdim, lo[1]:lo[1] + sdim, max(lo[2], 0):lo[2] + sdim] = True
    box[:, :, 100:] = False
    far = np.argwhere(box & (hu < -800))
    assert len(far)
    grads = {}
    for mode in ("copy", "none"):
        dt = DifferentiableTamper.from_model_dirs(tiny_ctgan_models / "INJ",
                                                  tiny_ctgan_models / "REM", resample="spline",
                                                  touchups=mode)
        for action in ("inject", "remove"):
            v = torch.from_numpy(hu.astype(np.float64)).requires_grad_(True)
            part, _ = dt.tampered(v, SPACING, center, action)[0]
            part.sum().backward()
            grads[mode, action] = v.grad.numpy()[tuple(far.T)]
    for action in ("inject", "remove"):
        assert np.abs(grads["copy", action]).max() > 0
        assert not np.any(grads["none", action])
