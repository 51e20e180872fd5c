"""The disruption target T of MITS-GAN's generator loss (docs/training.md#disruption-target).

For a sub-batch of protected slices x_p: write them (in HU) into the scan, let the frozen
CT-GAN inject (even sub-batches) or remove (odd ones) near them, and read the same slices back:
T = CT-GAN(x_p). L_G then contains -lambda * MSE(x_p, T). T is a constant (NumPy from Keras):
no gradient flows through CT-GAN in this, the published, black-box mode.

Differences from the published code are config flags (docs/fidelity.md): the scan is
held in memory and only the tampered footprint is restored after each call (`reread_scan`
restores the per-step disk read); attacker exceptions are counted and logged
(`attack_errors=silent` restores the silent zero); the near-end rule, tamper position and the
HU mapping are selectable. Every outcome is counted in `DisruptionStats`.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from procedures.attacker.interface import Attacker, Slab
from scanDataset import VolumeItem
from utils.hu_range import to_hu, to_net
from utils.errors import UnsafeFileError
from utils.lung import lung_mask
from utils.scan_io import load_scan

log = logging.getLogger("mitsgan.disruption")


@dataclass
class DisruptionStats:
    sub_batches: int = 0
    computed: int = 0            # sub-batches that got the term
    not_eligible: int = 0        # skipped by the near-end rule
    errors: collections.Counter = field(default_factory=collections.Counter)
    attack_seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(sub_batches=self.sub_batches, computed=self.computed,
                    not_eligible=self.not_eligible, errors=dict(self.errors),
                    attack_seconds=self.attack_seconds)

    @classmethod
    def from_dict(cls, d: dict) -> "DisruptionStats":
        return cls(d["sub_batches"], d["computed"], d["not_eligible"],
                   collections.Counter(d["errors"]), d["attack_seconds"])

    def summary(self) -> str:
        err = sum(self.errors.values())
        detail = ", ".join(f"{k}: {v}" for k, v in self.errors.items())
        return (f"disruption term computed for {self.computed}/{self.sub_batches} sub-batches "
                f"({self.not_eligible} outside the near-end rule, {err} attacker errors"
                + (f" [{detail}]" if detail else "") + ")")


class Locator:
    """Where CT-GAN tampers for a sub-batch starting at slice s (published or in-slab/in-lung)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._lungs: dict[int, np.ndarray] = {}    # per-volume lung voxel lists (z, y, x)

    def eligible(self, s: int, depth: int) -> bool:
        if self.cfg.near_end_rule:
            # Published: 32 < s and s + 32 < depth; s is a multiple of 4, so the first is 36.
            return 32 < s and s + 32 < depth
        return True

    def location(self, item: VolumeItem, s: int, rng: np.random.Generator) -> tuple[int, int, int]:
        depth, h, w = item.scan.hu.shape
        slab = self.cfg.slab
        # Published z = s + 8 lies past a 4-slice sub-batch (docs/training.md#tamper-location); "slab" tampers
        # at the sub-batch's middle slice so the in-painted cube covers it.
        z = s + 8 if self.cfg.tamper_z == "published" else s + slab // 2
        if self.cfg.tamper_yx == "published":
            # Published: y, x uniform integers in [90, 410] on 512 x 512; scaled for other sizes.
            y = int(rng.integers(round(90 * h / 512), round(410 * h / 512) + 1))
            x = int(rng.integers(round(90 * w / 512), round(410 * w / 512) + 1))
            return z, y, x
        lungs = self._lungs.get(item.index)
        if lungs is None:
            lungs = self._lungs[item.index] = np.argwhere(lung_mask(item.scan.hu))
        zc = min(max(z, 0), depth - 1)
        cand = lungs[lungs[:, 0] == zc] if len(lungs) else lungs
        if len(cand) == 0:  # no lung on this slice: nearest slice that has some
            if len(lungs) == 0:
                return z, h // 2, w // 2
            cand = lungs[np.abs(lungs[:, 0] - zc) == np.abs(lungs[:, 0] - zc).min()]
        _, y, x = cand[int(rng.integers(len(cand)))]
        return z, int(y), int(x)


class DisruptionTarget:
    """Computes T for one sub-batch, or None (ineligible / attacker failure)."""

    def __init__(self, cfg, attacker: Attacker | None = None):
        self.cfg = cfg
        if attacker is None:  # Keras, or its torch equal on the device (cfg.attacker_impl)
            from procedures.attacker.torch_attacker import (
                blackbox_attacker,
            )  # lazy: the attackers pull scipy.stats

            attacker = blackbox_attacker(cfg)
        self.attacker = attacker
        # Load the attacker now: a model file that asks to run code stops the run before
        # anything is written (docs/safety.md#untrusted-files-never-run-code). A missing/broken model stays a counted per-step error.
        for action in ("inject", "remove"):
            try:
                self.attacker.model(action)
            except UnsafeFileError:
                raise
            except Exception:  # noqa: BLE001 - a broken model is reported (and counted) per step
                pass
        self.locator = Locator(cfg)
        self.stats = DisruptionStats()
        self._work: dict[int, np.ndarray] = {}     # per-volume float32 HU working copies

    # --- the attacker interface ----------------------------------------------------------------
    def loss(self, sl: Slab) -> torch.Tensor | None:
        """MSE(x_p, T) for the slab, T a constant (no gradient through CT-GAN, as published), or
        None. T is kept on the slab for the sample grid."""
        sl.tampered = self.target(
            sl.item, sl.s, sl.x_p.detach()[0].double().cpu().numpy(), sl.k, sl.rng
        )
        if sl.tampered is None:
            return None
        x_p = sl.x_p if sl.x_p.dtype == torch.float64 else sl.x_p.float()  # bf16 under --amp
        return torch.nn.functional.mse_loss(x_p, torch.from_numpy(sl.tampered).to(x_p).unsqueeze(0))

    # --- T ------------------------------------------------------------------------------------
    def target(self, item: VolumeItem, s: int, x_p: np.ndarray, sub_index: int,
               rng: np.random.Generator) -> np.ndarray | None:
        """x_p: (S, H, W) protected slices in [-1, 1] (NumPy). Returns T like x_p, or None."""
        cfg = self.cfg
        self.stats.sub_batches += 1
        depth = item.scan.hu.shape[0]
        if not self.locator.eligible(s, depth):
            self.stats.not_eligible += 1
            return None
        action = "inject" if sub_index % 2 == 0 else "remove"
        coord = self.locator.location(item, s, rng)
        slab = slice(s, s + x_p.shape[0])
        t0 = time.perf_counter()
        changed = source = work = None
        try:
            if cfg.reread_scan:
                # Published: the whole scan is read again from disk, as float64, for every step
                # (inside the try: a failed read is a counted error, silent under attack_errors=silent).
                work = load_scan(item.path).hu.astype(np.float64)
            else:
                work = self._work.get(item.index)
                if work is None:
                    work = self._work[item.index] = item.scan.hu.astype(np.float32)
                source = item.scan.hu
            orig = item.scan.hu[slab].astype(np.float64)
            if cfg.hu_mapping == "published":
                # One joint min-max of the protected slices onto the original slices' HU range.
                p_hu = _minmax(x_p, orig.min(), orig.max(), cfg.span_guard)
            else:
                p_hu = to_hu(x_p.astype(np.float64), item.hu_min, item.hu_max)
            if cfg.quantize:  # what an int16 archive would store
                p_hu = np.round(p_hu)
            work[slab] = p_hu
            changed = self.attacker.tamper_volume(work, item.scan.spacing, coord, action, rng)
            t_hu = work[slab].astype(np.float64)
        except UnsafeFileError:  # a model file that asks to run code stops the run
            raise
        except Exception as e:  # counted, logged, and the step simply has no disruption term
            self.stats.errors[type(e).__name__] += 1
            if cfg.attack_errors == "count":
                log.warning("attacker failed on %s sub-batch %d (%s at %s): %s",
                            item.path, sub_index, action, coord, e)
            changed = None
            t_hu = None
        finally:
            if source is not None:  # restore only what changed (the footprint and the slab)
                if changed is None:  # a failed tamper may have written anywhere
                    work[...] = source
                else:
                    work[changed] = source[changed]
                    work[slab] = source[slab]
            self.stats.attack_seconds += time.perf_counter() - t0
        if t_hu is None:
            return None
        self.stats.computed += 1
        if cfg.hu_mapping == "published":
            return _minmax(
                t_hu, -1.0, 1.0, cfg.span_guard
            )  # one joint min-max of the tampered slices
        return to_net(t_hu, item.hu_min, item.hu_max)


def _minmax(a: np.ndarray, lo: float, hi: float, guard: bool = True) -> np.ndarray:
    """Joint min-max of `a` onto [lo, hi]. A constant `a` maps to lo with `guard`; without it
    to NaN, as the published division by zero does (NumPy's warning silenced)."""
    amin, amax = float(a.min()), float(a.max())
    span = amax - amin if (amax > amin or not guard) else 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a - amin) / span * (hi - lo) + lo
