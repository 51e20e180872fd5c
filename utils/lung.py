"""A simple lung mask: air-like voxels inside the body (threshold + connected components)."""
from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi


def lung_mask(hu: np.ndarray, threshold: float = -400.0, erode: int = 2) -> np.ndarray:
    """Boolean (z, y, x) mask of the lungs: voxels below `threshold` HU that are not connected
    (per slice) to the air around the body, keeping the two largest 3-D components."""
    air = hu < threshold
    mask = np.zeros_like(air)
    for z in range(air.shape[0]):
        lab, n = ndi.label(air[z])
        if n == 0:
            continue
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        inside = ~np.isin(lab, border) & (lab > 0)
        mask[z] = inside
    lab, n = ndi.label(mask)
    if n > 2:
        sizes = ndi.sum(mask, lab, index=np.arange(1, n + 1))
        keep = np.argsort(sizes)[-2:] + 1
        mask = np.isin(lab, keep)
    if erode:
        mask = ndi.binary_erosion(mask, iterations=erode)
    return mask
