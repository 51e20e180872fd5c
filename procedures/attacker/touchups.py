"""CT-GAN's noise touch-ups (docs/attack.md#touch-ups, step 8 of the attack), written once for
NumPy arrays and torch tensors.

The Keras pipeline (procedures.attacker.pipeline), the torch black-box attacker
(procedures.attacker.torch_attacker) and the differentiable attack (procedures.attacker.port,
`touchups="copy"`) all call these functions; with tensors every operation is differentiable
(torch.where, a masked mean, maximum/minimum), so a protector's gradient reaches the protected
scan through the blend and through the copied noise block. The array library is picked from the
argument's type; torch is imported only when a tensor comes in (tamper.py's NumPy path never
loads it).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import scipy.stats

if TYPE_CHECKING:
    import torch

REF_SCALE = 1.3                           # reference (touch-up) cube side = int(max(cube) * 1.3)
KERNEL_SIGMA = {"inject": 3.0, "remove": 0.1}
NOISE_LOW_HU = -800.0                     # copy noise: voxels above it are replaced (lung only)


def _xp(a):
    """numpy for arrays and NumPy scalars, torch for tensors."""
    if isinstance(a, (np.ndarray, np.generic, float, int)):
        return np
    import torch  # lazy: only a tensor brings us here, so torch is already loaded

    return torch


def _copy(a):
    return a.copy() if isinstance(a, np.ndarray) else a.clone()


@functools.lru_cache(maxsize=32)
def kern01(kernlen: int, nsig: float) -> np.ndarray:
    """CT-GAN's kern01: 2-D Gaussian kernel (gkern) of side `kernlen`, rescaled to [0, 1]."""
    interval = (2 * nsig + 1.0) / kernlen
    x = np.linspace(-nsig - interval / 2.0, nsig + interval / 2.0, kernlen + 1)
    kern1d = np.diff(scipy.stats.norm.cdf(x))
    k = np.sqrt(np.outer(kern1d, kern1d))
    k = k / k.sum()
    k = (k - k.min()) / (k.max() - k.min())
    k.setflags(write=False)
    return k


def kernel(sdim: int, action: str) -> np.ndarray:
    """The blend kernel of an action on a reference cube of side `sdim` (2-D, every slice)."""
    return kern01(int(sdim), KERNEL_SIGMA[action])


def noise_block_center(vol_shape) -> np.ndarray:
    """The copy-noise block's centre: (depth/2, 0.43 rows, 0.27 cols), truncated."""
    d, h, w = vol_shape[:3]
    return np.array([int(d / 2), int(h * 0.43), int(w * 0.27)])


def noise_from_block(block):
    """Copied noise from a reference-sized block of the tampered scan: voxels above -800 HU
    become the mean of those below, then the block's mean is subtracted.

    Deterministic. If no voxel is below -800 (the published code would give NaN) the noise is 0.
    Differentiable in `block` for tensors (the mean of the low voxels is part of the graph)."""
    xp = _xp(block)
    low = block < NOISE_LOW_HU
    if not bool(low.any()):
        return xp.zeros_like(block)
    x = xp.where(block > NOISE_LOW_HU, block[low].mean(), block)
    return x - x.mean()


def blend(mal, ben, noise, kern, action: str):
    """The final reference-cube block: the tampered block `mal` plus `noise`, blended into the
    benign block `ben` with the 2-D kernel `kern` (docs/attack.md#touch-ups).

    inject: f = sigmoid((mal + 700) / 70) * kern on the block *before* the noise (as published),
    final = max((mal + noise) * f + ben * (1 - f), ben): the nodule only ever adds density.
    remove: with m the minimum of both blocks, (mal + m) * k + (ben + m) * (1 - k) - m."""
    xp = _xp(mal)
    if action == "inject":
        factors = 1.0 / (1.0 + xp.exp(-((mal + 700.0) / 70.0))) * kern
        mal = mal + noise
        return xp.maximum(mal * factors + ben * (1 - factors), ben)
    mal = mal + noise
    m = xp.minimum(mal.min(), ben.min())
    return (mal + m) * kern + (ben + m) * (1 - kern) - m


def overlay(block, block_start, src, src_start, vol_shape):
    """`block` (a cut at `block_start`) with the voxels it shares with `src` (a cut of the same
    side at `src_start`) taken from `src`, inside the volume only: the copy-noise block read from
    the scan after the tampered reference block was pasted (a copy; the inputs are unchanged)."""
    side = np.asarray(block.shape[:3])
    b0, s0 = np.asarray(block_start), np.asarray(src_start)
    lo = np.maximum(np.maximum(b0, s0), 0)
    hi = np.minimum(np.minimum(b0 + side, s0 + np.asarray(src.shape[:3])),
                    np.asarray(vol_shape[:3]))
    if not np.all(hi > lo):
        return block
    out = _copy(block)
    out[tuple(slice(int(p - s), int(q - s)) for p, q, s in zip(lo, hi, b0))] = \
        src[tuple(slice(int(p - s), int(q - s)) for p, q, s in zip(lo, hi, s0))]
    return out


def inside_mask(start, side: int, vol_shape, device) -> torch.Tensor:
    """Mask (side^3 bool on `device`) of a block's voxels that lie inside the volume."""
    import torch  # lazy: the NumPy touch-ups need no torch

    r = torch.arange(side, device=device)
    axes = [(r + int(s) >= 0) & (r + int(s) < int(n)) for s, n in zip(start, vol_shape)]
    return axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]
