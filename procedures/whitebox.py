"""White-box disruption: gradients through CT-GAN (beyond the paper, issue 5).

The published loss only pushes x_p away from a constant target T = CT-GAN(x_p) computed in
NumPy (SPEC.md section 5): it cannot see how CT-GAN responds to the perturbation. Here CT-GAN's
generator runs as a differentiable PyTorch module loaded from the same `G_model.h5`
(procedures.ctgan_torch), so the generator learns perturbations that change CT-GAN's *output*:

    disruption = MSE( CT-GAN(protected)[cube], CT-GAN(real)[cube] )   (normalised units)

on the tampered cube of the location. CT-GAN(real) is computed without gradient. Only the
slices of the cube's z-range are built (the real slices with the protected slab in place).
The noise touch-ups (step 8) are not part of this graph (see ctgan_torch).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from procedures.ctgan_torch import DifferentiableTamper
from procedures.disruption import DisruptionStats, Locator


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

    def loss(self, item, s: int, x_p: torch.Tensor, sub_index: int, rng: np.random.Generator):
        """x_p: (1, S, H, W) protected slab in [-1, 1] with grad. Returns a scalar tensor or None."""
        self.stats.sub_batches += 1
        t0 = time.perf_counter()
        depth = item.scan.hu.shape[0]
        slab = x_p.shape[1]
        z, y, x = self.locator.location(item, s, rng)
        if not 0 <= z < depth:
            self.stats.errors["CoordinateError"] += 1
            return None
        cut = self.dt.cut_shape(item.scan.spacing)
        z0 = max(0, min(s, z - cut[0]))
        z1 = min(depth, max(s + slab, z + cut[0] + 1))
        span = max(item.hu_max - item.hu_min, 1.0)
        real = torch.from_numpy(item.scan.hu[z0:z1].astype(np.float32)).to(x_p.device)
        prot_hu = (x_p[0].float() + 1.0) / 2.0 * span + item.hu_min
        if self.cfg.quantize:
            prot_hu = straight_through_round(prot_hu)
        sub = torch.cat([real[: s - z0], prot_hu, real[s + slab - z0:]], dim=0)
        center = (z - z0, y, x)
        total = 0.0
        for action in self.actions(sub_index):
            with torch.no_grad():
                ref = self.dt.footprints(real, item.scan.spacing, center, action)[0][0]
            tam = self.dt.footprints(sub, item.scan.spacing, center, action)[0][0]
            total = total + ((tam - ref) * (2.0 / span)).pow(2).mean()
        self.stats.computed += 1
        self.stats.attack_seconds += time.perf_counter() - t0
        return total / len(self.actions(sub_index))
