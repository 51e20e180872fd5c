"""White-box disruption: gradients through CT-GAN (beyond the paper, issue 5).

The published loss only pushes x_p away from a constant target T = CT-GAN(x_p) computed in
NumPy (SPEC.md section 5): it cannot see how CT-GAN responds to the perturbation. Here CT-GAN's
generator runs as a differentiable PyTorch module loaded from the same `G_model.h5`
(procedures.ctgan_torch), so the generator learns perturbations that change CT-GAN's *output*:

    disruption = RMSE( CT-GAN(protected)[cube], CT-GAN(real)[cube] ) / 100 HU

on the tampered cube of the location. RMSE, not MSE: the MSE's gradient vanishes at x_p == x
(where a bounded generator starts) and, in normalised units, is ~1e-7 for a 10 HU change, so
the adversarial term swamped it and the perturbation stayed at ~1 HU (measured, README). The
RMSE's gradient has the same size at any disruption; 100 HU is a visible change in the cube. CT-GAN(real) is computed without gradient. Only the
slices of the cube's z-range are built (the real slices with the protected slab in place).
The noise touch-ups (step 8) are not part of this graph (see ctgan_torch).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from procedures.ctgan_torch import DifferentiableTamper
from procedures.disruption import DisruptionStats, Locator


DISRUPTION_SCALE_HU = 100.0


def straight_through_round(x: torch.Tensor) -> torch.Tensor:
    """Round to integer HU in the forward pass, identity gradient (int16 storage, issue 5)."""
    return x + (torch.round(x) - x).detach()


class WhiteboxDisruption:
    def __init__(self, cfg, device):
        self.cfg = cfg
        models = Path(cfg.models_dir)
        self.dt = DifferentiableTamper.from_model_dirs(
            models / "INJ", models / "REM", device=device, resample="spline",
            clamp="straight_through", work_dtype=torch.float32)
        # Location sampling and counters as in the black-box mode.
        self.locator = Locator(cfg)
        self.stats = DisruptionStats()

    def actions(self, sub_index: int) -> list[str]:
        if self.cfg.whitebox_both:
            return ["inject", "remove"]
        return ["inject" if sub_index % 2 == 0 else "remove"]

    def loss(self, item, s: int, x_p: torch.Tensor, sub_index: int, rng: np.random.Generator,
             protect_slab: Callable[[int], torch.Tensor] | None = None):
        """x_p: (1, S, H, W) protected slab in [-1, 1] with grad. Returns a scalar tensor or None.

        protect_slab(s2) -> the protected slab starting at s2, with grad: with
        cfg.whitebox_cube the other slabs that the attacked cube touches are protected too, as
        protect.py protects the whole scan (else CT-GAN sees only S of its ~13 slices perturbed
        at 2.5 mm in training but all of them after protection)."""
        self.stats.sub_batches += 1
        t0 = time.perf_counter()
        depth = item.scan.hu.shape[0]
        slab = x_p.shape[1]
        z, y, x = self.locator.location(item, s, rng)
        if not 0 <= z < depth:
            self.stats.errors["CoordinateError"] += 1
            return None
        cut = self.dt.cut_shape(item.scan.spacing)
        span = max(item.hu_max - item.hu_min, 1.0)

        def to_hu(v):
            hu = (v[0].float() + 1.0) / 2.0 * span + item.hu_min
            return straight_through_round(hu) if self.cfg.quantize else hu

        pieces = {s: to_hu(x_p)}
        if self.cfg.whitebox_cube and protect_slab is not None:
            half = cut[0] // 2 + 1  # the cube's z half-extent, rounded up
            # The slab (aligned with s) holding z - half; the first whole slab if that is < 0.
            first = max(s % slab, s + (z - half - s) // slab * slab)
            for s2 in range(first, min(z + half, depth - slab) + 1, slab):
                if s2 != s:
                    pieces[s2] = to_hu(protect_slab(s2))
        starts = sorted(pieces)
        z0 = max(0, min(starts[0], z - cut[0]))
        z1 = min(depth, max(starts[-1] + slab, z + cut[0] + 1))
        real = torch.from_numpy(item.scan.hu[z0:z1].astype(np.float32)).to(x_p.device)
        parts, cur = [], z0
        for s2 in starts:  # real slices between the protected slabs
            parts += [real[cur - z0:s2 - z0], pieces[s2]]
            cur = s2 + slab
        sub = torch.cat(parts + [real[cur - z0:]], dim=0)
        center = (z - z0, y, x)
        total = 0.0
        for action in self.actions(sub_index):
            with torch.no_grad():
                ref = self.dt.footprints(real, item.scan.spacing, center, action)[0][0]
            tam = self.dt.footprints(sub, item.scan.spacing, center, action)[0][0]
            total = total + ((tam - ref).pow(2).mean() + 1e-6).sqrt() / DISRUPTION_SCALE_HU
        self.stats.computed += 1
        self.stats.attack_seconds += time.perf_counter() - t0
        return total / len(self.actions(sub_index))
