"""White-box disruption: gradients through CT-GAN (beyond the paper).

The published loss only pushes x_p away from a constant target T = CT-GAN(x_p) computed in
NumPy (docs/fidelity.md): it cannot see how CT-GAN responds to the perturbation. Here CT-GAN's
generator runs as a differentiable PyTorch module loaded from the same `G_model.h5`
(procedures.attacker.port), so the generator learns perturbations that change CT-GAN's *output*:

    disruption = RMSE( CT-GAN(protected)[cube], CT-GAN(real)[cube] ) / 100 HU

on the tampered cube of each location, averaged over the step's locations, actions and
attackers. RMSE, not MSE: the MSE's gradient vanishes at x_p == x (where a bounded generator
starts) and, in normalised units, is ~1e-7 for a 10 HU change, so the adversarial term swamped it
and the perturbation stayed at ~1 HU (docs/results.md). The RMSE's gradient has the same size at
any disruption; 100 HU is a visible change in the cube. CT-GAN(real) is computed without
gradient. Only the slices of the cubes' z-range are built (real slices with protected slabs in
place). With `wb_touchups copy` the noise touch-ups (step 8) are in the graph too: the slices
then cover the reference cubes and the copy-noise block (docs/attack.md#pytorch-port), and only
the slabs of the cubes are G's (the rest of those slices are real, where protect.py would
protect them too).

Untargeted levers (config fields; docs/training.md "Untargeted protection: what each lever
does" has their measured effect): `wb_locations` locations per slab, all in one batched CT-GAN
call per action; `wb_shift` random offsets of each cube centre; `whitebox_both` both actions;
`ensemble_models` more attackers; `whitebox_cube` every slab the cubes touch is protected by G
(one batched G call).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from procedures.attacker.model_dir import load_attacker_pair
from procedures.protection.disruption import DisruptionStats, Locator, Slab
from procedures.protection.apply import slabs_meeting
from procedures.protection.targeted import rmse_hu
from utils.hu_range import to_hu


DISRUPTION_SCALE_HU = 100.0


def straight_through_round(x: torch.Tensor) -> torch.Tensor:
    """Round to integer HU in the forward pass, identity gradient (what int16 storage keeps)."""
    return x + (torch.round(x) - x).detach()


def attacker_dirs(cfg) -> list[Path]:
    """The CT-GAN model folders (each with INJ/ and REM/): models_dir, then ensemble_models."""
    extra = [Path(d.strip()) for d in cfg.ensemble_models.split(",") if d.strip()]
    return [Path(cfg.models_dir)] + extra


class WhiteboxDisruption:
    def __init__(self, cfg, device):
        self.cfg = cfg
        self.attackers = [
            load_attacker_pair(d, device, touchups=getattr(cfg, "wb_touchups", "none"))
            for d in attacker_dirs(cfg)
        ]
        self.dt = self.attackers[0]
        # Location sampling and counters as in the black-box mode.
        self.locator = Locator(cfg)
        self.stats = DisruptionStats()

    def actions(self, sub_index: int) -> list[str]:
        if self.cfg.whitebox_both:
            return ["inject", "remove"]
        return ["inject" if sub_index % 2 == 0 else "remove"]

    def centres(self, sl: Slab) -> list[tuple[int, int, int]]:
        """The slab's tamper locations: wb_locations draws of the Locator, each moved by a random
        offset in [-wb_shift, wb_shift] voxels per axis (clipped to the scan)."""
        shape = sl.item.scan.hu.shape
        found = [self.locator.location(sl.item, sl.s, sl.rng) for _ in range(self.cfg.wb_locations)]
        if self.cfg.wb_shift:
            off = sl.rng.integers(-self.cfg.wb_shift, self.cfg.wb_shift + 1, size=(len(found), 3))
            found = [tuple(int(np.clip(c + o, 0, n - 1)) for c, o, n in zip(cen, offs, shape))
                     for cen, offs in zip(found, off)]
        return found

    def loss(self, sl: Slab) -> torch.Tensor | None:
        """The disruption of the slab's protected x_p (1, S, H, W) in [-1, 1] (with grad): a scalar
        tensor, or None when the location is outside the scan.

        With cfg.whitebox_cube and sl.protect, the other slabs the attacked cubes touch are
        protected too, as protect.py protects the whole scan (else CT-GAN sees only S of its ~13
        slices perturbed at 2.5 mm in training but all of them after protection)."""
        self.stats.sub_batches += 1
        t0 = time.perf_counter()
        item, s, slab = sl.item, sl.s, sl.x_p.shape[1]
        depth = item.scan.hu.shape[0]
        centres = self.centres(sl)
        if not all(0 <= c[0] < depth for c in centres):
            self.stats.errors["CoordinateError"] += 1
            return None
        cut = self.dt.cut_shape(item.scan.spacing)[0]
        half = cut // 2 + 1  # the cube's z half-extent, rounded up
        zs = [c[0] for c in centres]
        starts = [s]
        if self.cfg.whitebox_cube and sl.protect is not None:
            starts = sorted({s, *slabs_meeting(depth, slab, min(zs) - half, max(zs) + half + 1)})
        win = self.dt.window(item.scan.spacing, centres, item.scan.hu.shape)[0]  # what it reads
        sub, z0 = self._subvolume(sl, starts, min(min(zs) - cut, win.start),
                                  max(max(zs) + cut, win.stop - 1))
        terms = [self._rmse(dt, item, sub, z0, centres, action)
                 for dt in self.attackers for action in self.actions(sl.k)]
        self.stats.computed += 1
        self.stats.attack_seconds += time.perf_counter() - t0
        return sum(terms[1:], terms[0]) / len(terms)

    def _to_hu(self, item, v: torch.Tensor) -> torch.Tensor:
        hu = to_hu(v.float(), item.hu_min, item.hu_max)
        return straight_through_round(hu) if self.cfg.quantize else hu

    def _subvolume(self, sl: Slab, starts: list[int], lo: int, hi: int) -> tuple[torch.Tensor, int]:
        """Slices [z0, z1) in HU covering the protected slabs `starts` and [lo, hi]: real slices
        with G's protected slabs in place (in start order: the end-aligned last slab wins its
        overlap, as in protect.py). The step's own slab is sl.x_p; the others come from one
        batched sl.protect call."""
        item, slab = sl.item, sl.x_p.shape[1]
        depth = item.scan.hu.shape[0]
        z0, z1 = max(0, min(starts[0], lo)), min(depth, max(starts[-1] + slab, hi + 1))
        others = [t for t in starts if t != sl.s]
        pieces = {sl.s: self._to_hu(item, sl.x_p[0])}
        if others:
            pieces.update(zip(others, self._to_hu(item, sl.protect(others))))
        sub = torch.from_numpy(item.scan.hu[z0:z1].astype(np.float32)).to(sl.x_p.device)
        for t in starts:
            a = t - z0
            sub = torch.cat([sub[:a], pieces[t], sub[a + slab:]], dim=0)
        return sub, z0

    def _rmse(self, dt, item, sub: torch.Tensor, z0: int, centres, action: str) -> torch.Tensor:
        """Mean over the centres (scan voxels) of RMSE(CT-GAN(sub), CT-GAN(real)) / 100 HU in
        each cube: one batched CT-GAN call for all centres (the volume is expanded, not copied);
        `sub` holds the scan's slices from z0 on."""
        real = torch.from_numpy(item.scan.hu[z0 : z0 + sub.shape[0]].astype(np.float32)).to(
            sub.device
        )
        n = len(centres)
        frame, sp = ((z0, 0, 0), item.scan.hu.shape), item.scan.spacing
        with torch.no_grad():
            refs = dt.tampered(real.expand(n, *real.shape), sp, centres, action, frame=frame)
        tams = dt.tampered(sub.expand(n, *sub.shape), sp, centres, action, frame=frame)
        rm = [rmse_hu(tam, ref) for (tam, _), (ref, _) in zip(tams, refs)]
        return sum(rm[1:], rm[0]) / n / DISRUPTION_SCALE_HU
