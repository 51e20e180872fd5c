"""A synthetic chest in HU: the tests' and the benchmark's scan when no real one is needed."""
from __future__ import annotations

import numpy as np


def phantom(shape=(40, 64, 64), seed: int = 0) -> np.ndarray:
    """A chest-like int16 HU volume (the tests' and the benchmark's synthetic scan): body ~40 HU,
    two lungs ~-850 HU, a ~60 HU 'nodule' of radius 3 in the right lung, air outside the body,
    Gaussian noise sd 15 HU. Built slice by slice (the noise drawn in the same order as one
    whole-volume draw) so that a 512x512x300 volume needs no float copy of itself."""
    d, h, w = shape
    rng = np.random.default_rng(seed)
    y, x = np.indices((h, w), dtype=np.float32)
    cz, cy, cx = d / 2, h / 2, w / 2
    body = ((y - cy) / (0.45 * h)) ** 2 + ((x - cx) / (0.48 * w)) ** 2 < 1
    lungs = np.zeros((h, w), bool)
    for sx in (-0.22, 0.22):
        lungs |= ((y - cy) / (0.3 * h)) ** 2 + ((x - cx - sx * w) / (0.16 * w)) ** 2 < 1
    base = np.where(body, 40.0, -1000.0).astype(np.float32)
    vol = np.empty(shape, np.int16)
    for z in range(d):
        sl = base.copy()
        if abs(z - cz) < 0.45 * d:
            sl[lungs] = -850.0
        sl[np.float32((z - cz) ** 2) + (y - cy) ** 2 + (x - cx - 0.22 * w) ** 2 < 9] = 60.0
        sl += rng.normal(0, 15, (h, w)).astype(np.float32)
        vol[z] = np.clip(np.round(sl), -1024, 3071)
    return vol
