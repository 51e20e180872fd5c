"""Protection methods for the evaluation: a ProtectionMethod is a name, a column label and a
callable (VolumeItem) -> protected HU array of the scan's shape. MITS-GAN, Gaussian noise,
random +-eps signs, a generator at another eps, targeted protection, the ceiling's saved
perturbations (procedures.protection.ceiling); TAFIM builds its own in
procedures.baselines.tafim. Adding a method is one entry in the list given to
procedures.evaluation.run.evaluate (docs/results.md)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from procedures.protection.apply import protect_hu
from procedures.protection.targeted import (
    TargetSettings,
    background,
    protect_targets,
    targets_for_scan,
)
from scanDataset import VolumeItem
from utils import metrics as M
from utils.stored import stored_as


@dataclass
class ProtectionMethod:
    name: str                                        # short key: mitsgan, noise, tafim, ...
    label: str                                       # column label in the tables
    protect: Callable[[VolumeItem], np.ndarray]      # protected HU, shape of item.scan.hu
    stored: bool = True  # False: evaluated in float, not rounded to int16

    def __post_init__(self):
        self.protect = _last_item_cache(self.protect)


def _last_item_cache(fn):
    """Remember the result for the last item only: methods that build on another (the matched
    noise) reuse its output without keeping every scan in memory."""
    if getattr(fn, "_cached", False):
        return fn
    memo: dict = {}

    def wrapped(item: VolumeItem) -> np.ndarray:
        key = (item.path, id(item))
        if memo.get("key") != key:
            memo.clear()
            memo["value"] = fn(item)
            memo["key"] = key
        return memo["value"]

    wrapped._cached = True
    return wrapped


def as_stored(hu: np.ndarray, like: np.ndarray) -> np.ndarray:
    """What a hospital would store: rounded and clipped to the source's integer type (int16 CT),
    returned as float32 for the attack."""
    return stored_as(hu, like.dtype).astype(np.float32, copy=False)


def mitsgan_method(
    G,
    cfg,
    device,
    dtype,
    *,
    seed: int = 0,
    batch: int = 4,
    progress=None,
    label: str = "MITS-GAN",
    name: str = "mitsgan",
    stored: bool = True,
) -> ProtectionMethod:
    """Protection with a trained MITS-GAN generator (procedures.protection.apply.protect_hu).
    stored=False keeps the float32 output (what the network made, before int16 storage rounds
    it): the float-vs-stored comparison (docs/results.md)."""
    def run(item: VolumeItem) -> np.ndarray:
        hu = item.scan.hu
        integer = stored and np.issubdtype(hu.dtype, np.integer)
        out = np.empty(hu.shape, dtype=hu.dtype if integer else np.float32)
        return protect_hu(G, hu, cfg, device, hu_min=item.hu_min, hu_max=item.hu_max, dtype=dtype,
                          seed=seed, batch=batch, out=out, progress=progress,
                          desc=f"protect {Path(item.path).name}")

    return ProtectionMethod(name, label, run, stored=stored)


def gaussian_noise_method(rms_hu: float | Callable[[VolumeItem], float], *, seed: int = 0,
                          label: str = "Gaussian noise") -> ProtectionMethod:
    """Baseline: i.i.d. Gaussian noise of the given RMS in HU (a number, or a function of the
    item, e.g. matched_rms(mitsgan) for the same RMS as MITS-GAN's perturbation of that scan).
    Seeded by (seed, scan name)."""
    def run(item: VolumeItem) -> np.ndarray:
        sigma = float(rms_hu(item) if callable(rms_hu) else rms_hu)
        rng = np.random.default_rng([int(seed), zlib.crc32(Path(item.path).name.encode())])
        hu = item.scan.hu
        out = hu.astype(np.float32)
        for z in range(hu.shape[0]):  # slice by slice: no whole-volume float64 temporary
            out[z] += rng.standard_normal(hu.shape[1:], dtype=np.float32) * np.float32(sigma)
        return out

    return ProtectionMethod("noise", label, run)


def random_signs_method(eps_hu: float, *, seed: int = 0, label: str | None = None,
                        name: str = "signs") -> ProtectionMethod:
    """Baseline: random +-eps HU on every voxel (the largest RMS an L-inf bound of eps allows,
    no learning). Seeded by (seed, scan name)."""

    def run(item: VolumeItem) -> np.ndarray:  # the targeted protection's background "signs"
        return background(item.scan.hu, TargetSettings(eps=eps_hu, seed=seed), Path(item.path).name)

    return ProtectionMethod(name, label or f"random +-{eps_hu:g} HU signs", run)


def eps_scaled_method(base: ProtectionMethod, eps_hu: float, bound_hu: float, *, name: str,
                      label: str) -> ProtectionMethod:
    """A generator's protection at another bound, from its float output `base` (computed once
    per scan): a bounded generator (x + eps * tanh(r), bound_hu > 0) scales its perturbation by
    eps / bound_hu, which is what running it with that bound gives before storage; an unbounded
    one has its perturbation clipped to +-eps. Stored as int16 like every column."""
    def run(item: VolumeItem) -> np.ndarray:
        hu = item.scan.hu
        out = base.protect(item).astype(np.float32, copy=True)
        for z in range(hu.shape[0]):
            d = out[z] - hu[z]
            d = d * np.float32(eps_hu / bound_hu) if bound_hu > 0 else np.clip(d, -eps_hu, eps_hu)
            out[z] = hu[z] + d
        return out

    return ProtectionMethod(name, label, run)


def targeted_method(attacker, rows, settings, *, label: str | None = None, name: str = "targeted",
                    progress=None, boxes: dict | None = None) -> ProtectionMethod:
    """Targeted protection (procedures.protection.targeted) of the targets CSV rows of each scan, its
    settings.background elsewhere. `attacker`: a procedures.attacker.port.DifferentiableTamper
    (the seen attacker). `boxes`: a cache shared by methods of equal settings but background."""
    boxes = {} if boxes is None else boxes  # scan path -> [(box, d)]: small, reused
    # With step 8 in the graph the attack sees the background (through the copy-noise block), so
    # the optimised boxes depend on it; without, methods that differ only there share them.
    step8 = getattr(attacker, "touchups", "none") != "none"

    def run(item: VolumeItem) -> np.ndarray:
        out = background(item.scan.hu, settings, Path(item.path).name)
        key = (item.path, settings.background) if step8 else item.path
        if key not in boxes:
            centres = targets_for_scan(rows, item.scan, Path(item.path).name, strict=False)
            _, info = protect_targets(attacker, item.scan.hu, item.scan.spacing, centres, settings,
                                      progress=progress, keep=True, base=out)
            boxes[key] = [(i["slices"], i["d"]) for i in info]
        for box, d in boxes[key]:
            out[box] = item.scan.hu[box].astype(np.float32) + d
        return out

    return ProtectionMethod(name, label or f"targeted, eps {settings.eps:g} HU", run)


def matched_rms(method: ProtectionMethod) -> Callable[[VolumeItem], float]:
    """The RMS (HU) of `method`'s perturbation of an item, as stored."""
    def rms(item: VolumeItem) -> float:
        return M.perturbation_stats(as_stored(method.protect(item), item.scan.hu), item.scan.hu)[
            "rms_hu"
        ]

    return rms


def ceiling_method(folder, *, eps: float | None = None, label: str | None = None,
                   name: str = "ceiling") -> ProtectionMethod:
    """The scan plus its saved ceiling perturbation (<folder>/<scan stem>.npy, int8, written by
    procedures.protection.ceiling), checked against the bound `eps` when given."""
    from procedures.protection.ceiling import load_perturbation  # lazy: torch only for this method

    def run(item: VolumeItem) -> np.ndarray:
        hu = item.scan.hu
        d = load_perturbation(folder, Path(item.path).name, hu.shape, eps)
        out = hu.astype(np.float32)
        for z in range(hu.shape[0]):
            out[z] += d[z]
        return out

    return ProtectionMethod(name, label or f"ceiling ({Path(folder).name})", run)


def tafim_method(model, device="cpu", *, batch: int = 4, progress=None,
                 label: str = "TAFIM"):
    """Protection with a trained TAFIM net (procedures.baselines.tafim.protect_hu)."""
    from procedures.baselines.tafim import protect_hu as tafim_protect  # lazy: torch

    def run(item) -> np.ndarray:
        hu = item.scan.hu
        integer = np.issubdtype(hu.dtype, np.integer)
        out = np.empty(hu.shape, dtype=hu.dtype if integer else np.float32)
        return tafim_protect(model, hu, device, hu_min=item.hu_min, hu_max=item.hu_max,
                             batch=batch, out=out, progress=progress,
                             desc=f"TAFIM {Path(item.path).name}")

    return ProtectionMethod("tafim", label, run)
