"""Lung masks: air-like voxels inside the body (threshold + connected components)."""
from __future__ import annotations

import numpy as np
import scipy.ndimage


def lung_masks(hu: np.ndarray) -> list[np.ndarray]:
    """The two lungs: HU < -400 inside the body, components not touching the in-plane border,
    largest two. Returned as separate boolean masks (largest first)."""
    body = hu > -500
    lab, k = scipy.ndimage.label(body)
    if k:
        sizes = np.bincount(lab.ravel())[1:]
        body = lab == (1 + int(np.argmax(sizes)))
    body = np.stack([scipy.ndimage.binary_fill_holes(s) for s in body])
    low = (hu < -400) & body
    lab, k = scipy.ndimage.label(low)
    border = set(np.unique(np.concatenate([lab[:, 0, :].ravel(), lab[:, -1, :].ravel(),
                                            lab[:, :, 0].ravel(), lab[:, :, -1].ravel()])))
    sizes = np.bincount(lab.ravel(), minlength=k + 1)
    sizes[0] = 0
    for b in border:
        sizes[b] = 0
    order = np.argsort(sizes)[::-1]
    lungs = [lab == i for i in order[:2] if sizes[i] > 0]
    if len(lungs) == 1 or sizes[order[1]] < 0.2 * sizes[order[0]]:
        # The lungs touch (through the airways): split the largest at the body's mid-line.
        both = lungs[0]
        mid = int(round(np.nonzero(body.any(axis=(0, 1)))[0].mean()))
        left, right = both.copy(), both.copy()
        left[:, :, mid:] = False
        right[:, :, :mid] = False
        lungs = sorted([left, right], key=lambda m: -int(m.sum()))
    return lungs


def lung_mask(hu: np.ndarray) -> np.ndarray:
    """Union of both lungs as one boolean (z, y, x) mask (empty when none are found)."""
    masks = lung_masks(hu)
    return np.logical_or.reduce(masks) if masks else np.zeros(hu.shape, dtype=bool)
