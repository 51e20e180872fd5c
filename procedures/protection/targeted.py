"""Targeted protection: optimise the perturbation around known findings against CT-GAN.

A hospital knows where its findings are (the nodules a report lists): that is where an attacker
would remove, and where an injection would be most misleading. For each target the perturbation
of the region any attack cube can reach is optimised directly through the PyTorch CT-GAN port
(procedures.attacker.port), as procedures.protection.bound does for one location: d = eps * tanh(w),
rounded to integer HU in the forward pass (straight-through; int16 storage keeps exactly that),
Adam maximising RMSE(CT-GAN(real + d), CT-GAN(real)) in the cube, for removal and injection.
The attack in the graph is the whole attack by default, noise touch-ups (step 8) included
(`load_attacker(touchups="copy")`, docs/attack.md#pytorch-port): the tampered cube then
depends on the protected scan's copy-noise block and on max(blend, benign) for injection, as
the Keras pipeline the evaluation runs.

The attacker clicks by hand, so the cube centre is not the target's voxel: every step draws
random integer offsets within +-radius voxels on every axis (CT-GAN truncates the centre to a
voxel) and the loss is the mean over offsets and actions. Optimised for the exact centre only,
the perturbation disrupts little one voxel off (docs/results.md).

Elsewhere the scan keeps the generator's protection, or gets random +-eps signs (background
"signs": CT-GAN's noise touch-up copies a fixed block of the protected scan into every tampered
cube, so a whole-scan perturbation reaches every tamper that way; docs/results.md measures it),
or is left as it is ("none"): the region of a target is replaced by real + d, so
|protected - real| <= eps there whatever the generator did.

Targets CSV: a header with z,y,x (voxel indices, or world mm with a `coord` column saying
`world` on that row, as data/*/nodules.csv); an optional `filename` column keeps only the rows
of the scan being protected.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.cubes import cube_bounds
from utils.errors import CoordinateError, InputFileError, UsageError
from utils.scan import check_coord
from utils.locations_csv import read_locations_csv
from utils.stored import stored_as


@dataclass
class TargetSettings:
    eps: float = 10.0            # L-inf bound in HU (integer HU as stored)
    steps: int = 120             # Adam steps per target
    method: str = "adam"         # adam: Adam on w, d = eps * tanh(w); pgd: sign-gradient steps on d
    lr: float = 0.1              # adam: its learning rate; pgd: first step as a fraction of eps
    radius: int = 2              # cube-centre offsets optimised over: +-radius voxels per axis
    offsets_per_step: int = 2    # random offsets per step (each tampered with every action)
    actions: tuple = ("inject", "remove")
    seed: int = 0
    parity: int | None = None    # only offsets with (oz + oy + ox) % 2 == parity (held-out checks)
    background: str = "signs"    # outside the targets: signs (random +-eps, seeded) or none

    def validate(self) -> "TargetSettings":
        if not self.eps > 0 or self.steps < 1 or self.radius < 0 or self.offsets_per_step < 1:
            raise UsageError("targeted protection: eps must be > 0, steps and offsets per step >= 1, "
                             "radius >= 0")
        if self.method not in ("pgd", "adam"):
            raise UsageError(f"targeted protection: method must be pgd or adam, not {self.method!r}")
        if not self.actions or any(a not in ("inject", "remove") for a in self.actions):
            raise UsageError(f"targeted protection: actions must be inject and/or remove, not {self.actions!r}")
        if self.background not in BACKGROUNDS:
            raise UsageError(f"targeted protection: background must be signs or none, not {self.background!r}")
        return self


BACKGROUNDS = ("signs", "none")


def background(hu: np.ndarray, s: TargetSettings, name: str) -> np.ndarray:
    """float32 HU outside the targets: hu + random +-eps signs seeded by (seed, scan file name),
    the same draw as the evaluation's signs baseline, or hu itself (background "none")."""
    out = hu.astype(np.float32)
    if s.background == "signs":
        rng = np.random.default_rng([int(s.seed), zlib.crc32(Path(name).name.encode()), 1])
        for z in range(hu.shape[0]):
            out[z] += np.where(rng.random(hu.shape[1:]) < 0.5, -1.0, 1.0).astype(np.float32) * np.float32(s.eps)
    return out


# ----------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------
def read_target_rows(path) -> list[dict]:
    """The rows of a targets CSV as dicts {filename, zyx (floats), world (bool)}.
    Empty, header-only, or malformed files raise InputFileError (one line)."""
    return [{"filename": r.filename, "zyx": r.zyx, "world": r.world}
            for r in read_locations_csv(path, what="targets")]


def targets_for_scan(rows: list[dict], scan, name: str | None, *, strict: bool = True) -> list[tuple]:
    """Voxel centres (z, y, x ints, truncated like CT-GAN's cut) of the rows for scan `name`
    (rows without a filename apply to every scan). strict: a target outside the scan is a
    CoordinateError; else it is skipped."""
    out = []
    for r in rows:
        if name is not None and r["filename"] and Path(r["filename"]).name != Path(name).name:
            continue
        c = scan.world2vox(r["zyx"]) if r["world"] else r["zyx"]
        try:
            out.append(tuple(int(v) for v in check_coord(c, scan.hu.shape)))
        except CoordinateError as e:
            if strict:
                shown = ",".join(f"{v:g}" for v in r["zyx"]) + (" world mm" if r["world"] else "")
                raise CoordinateError(f"target ({shown}): {e}") from None
    if strict and not out:
        raise InputFileError(f"no target for {name} in the targets CSV")
    return out


# ----------------------------------------------------------------------------------------------
# optimisation
# ----------------------------------------------------------------------------------------------
def reach_box(cut, center, radius: int, vol_shape) -> tuple[slice, slice, slice]:
    """The voxels any attack cube centred within +-radius of `center` can cover (clipped)."""
    cut = np.asarray(cut, dtype=np.int64)
    start, stop, _, _ = cube_bounds(center, cut, vol_shape)
    lo = np.clip(start - radius, 0, vol_shape)
    hi = np.clip(stop + radius, 0, vol_shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def offset_grid(radius: int, parity: int | None = None) -> np.ndarray:
    """All integer offsets within +-radius per axis (with (sum % 2) == parity when given)."""
    r = np.arange(-radius, radius + 1)
    grid = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    if parity is not None:
        grid = grid[grid.sum(1) % 2 == parity]
    return grid


def rmse_hu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMSE in HU, with a gradient at a == b too (the disruption every optimiser maximises)."""
    return ((a - b).pow(2).mean() + 1e-6).sqrt()


def pgd_step(w: torch.Tensor, grad: torch.Tensor, eps: float, lr: float, t: int,
             steps: int) -> None:
    """One L-inf sign-gradient descent step on `w` in place, clamped to +-eps: step size
    lr * eps at step 0, decaying linearly to a tenth of it at the last step."""
    w -= lr * eps * (1.0 - 0.9 * t / steps) * torch.sign(grad)
    w.clamp_(-eps, eps)


def optimise_target(dt, hu: np.ndarray, spacing, center, s: TargetSettings,
                    base: np.ndarray | None = None) -> tuple[tuple, np.ndarray]:
    """Optimise one target. Returns (box slices, integer perturbation d of the box's shape).

    The attack runs on `base` (the scan as protected outside the targets; default hu itself)
    with the box replaced by real + d, in a window holding everything it reads: with step 8 in
    the graph (dt.touchups 'copy') the reference cubes and the copy-noise block, whose
    perturbation outside the box (the background) then counts as the evaluation sees it."""
    from procedures.protection.whitebox import straight_through_round  # lazy: whitebox loads the CT-GAN port (SciPy)

    dims = tuple(int(n) for n in hu.shape)
    box = reach_box(dt.cut_shape(spacing), center, s.radius, dims)
    grid = offset_grid(s.radius, s.parity)
    hi = np.asarray(dims) - 1
    win = _join(dt.window(spacing, np.clip(np.asarray(center) + grid, 0, hi), dims), box)
    origin = np.array([w.start for w in win])
    inner = tuple(slice(b.start - o, b.stop - o) for b, o in zip(box, origin))
    real = torch.from_numpy(np.ascontiguousarray(hu[win], dtype=np.float32))
    outside = real if base is None else torch.from_numpy(
        np.ascontiguousarray(base[win], dtype=np.float32))
    rng = np.random.default_rng([int(s.seed), *(int(v) for v in center)])
    g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    shape = real[inner].shape
    if s.method == "adam":
        # A random start: at d = 0 the RMSE's gradient is 0 (CT-GAN(real + 0) == CT-GAN(real)).
        w = (0.3 * torch.randn(shape, generator=g)).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=s.lr)
    else:  # L-inf PGD (sign of the gradient) from random +-eps signs, the baseline itself
        w = (s.eps * (2.0 * torch.randint(0, 2, shape, generator=g) - 1.0)).requires_grad_(True)
    refs: dict = {}
    acts = list(s.actions)
    frame = (origin, dims)
    for t in range(s.steps):
        offs = grid[rng.integers(len(grid), size=s.offsets_per_step)]
        cents = np.repeat(np.clip(np.asarray(center)[None] + offs, 0, hi), len(acts), axis=0)
        actions = acts * len(offs)
        need = [(tuple(c), a) for c, a in zip(cents, actions) if (tuple(c), a) not in refs]
        if need:
            with torch.no_grad():
                feet = dt.tampered(real.expand(len(need), *real.shape), spacing,
                                   np.array([c for c, _ in need]), [a for _, a in need],
                                   frame=frame)
            refs.update({k: f[0] for k, f in zip(need, feet)})
        d = straight_through_round(s.eps * torch.tanh(w) if s.method == "adam" else w)
        vol = outside.clone()
        vol[inner] = real[inner] + d
        feet = dt.tampered(vol.expand(len(cents), *vol.shape), spacing, cents, actions, frame=frame)
        loss = -torch.stack([rmse_hu(f[0], refs[(tuple(c), a)])
                             for f, c, a in zip(feet, cents, actions)]).mean()
        w.grad = None
        loss.backward()
        with torch.no_grad():
            if s.method == "adam":
                opt.step()
            else:
                pgd_step(w, w.grad, s.eps, s.lr, t, s.steps)
    with torch.no_grad():
        d = torch.round(s.eps * torch.tanh(w) if s.method == "adam" else w).numpy()
    return box, d


def _join(a, b) -> tuple[slice, slice, slice]:
    """The bounding box of two boxes of slices."""
    return tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(a, b))


def optimise_targets(dt, hu: np.ndarray, spacing, targets, s: TargetSettings, progress=None,
                     base: np.ndarray | None = None):
    """Yield (info dict, box slices, integer d) per target, optimised one after the other on
    `base` (the protection outside the targets, default the scan itself)."""
    s.validate()
    it = targets if progress is None else progress(targets, desc="targets", unit="target", leave=False)
    for center in it:
        t0 = time.perf_counter()
        box, d = optimise_target(dt, hu, spacing, center, s, base)
        yield ({"target": tuple(int(v) for v in center), "box": [(b.start, b.stop) for b in box],
                "max_hu": float(np.abs(d).max()), "seconds": time.perf_counter() - t0}, box, d)


def protect_targets(dt, hu: np.ndarray, spacing, targets, s: TargetSettings, *, base=None,
                    progress=None, keep: bool = False) -> tuple[np.ndarray, list[dict]]:
    """Protected HU (float32, shape of hu): `base` (the generator's protection, default the scan
    itself) with each target's reach box replaced by real + its optimised perturbation.
    Returns (protected, one info dict per target; keep=True adds its box "slices" and "d")."""
    out = np.array(hu if base is None else base, dtype=np.float32)
    info = []
    for i, box, d in optimise_targets(dt, hu, spacing, targets, s, progress, base=out):
        out[box] = hu[box].astype(np.float32) + d
        info.append({**i, **({"slices": box, "d": d} if keep else {})})
    return out, info


def load_attacker(models, actions=("inject", "remove"), device=None, touchups: str = "copy"):
    """The differentiable CT-GAN (spline resampling, as the Keras pipeline) from a models folder;
    touchups 'copy' (default): with step 8, the whole attack (docs/attack.md#pytorch-port)."""
    # lazy: the attacker pulls SciPy; reading targets needs none of it
    from procedures.attacker.model_dir import load_attacker_pair

    return load_attacker_pair(models, device, actions, touchups=touchups)


def protect_scan_targets(scan, centres, out: np.ndarray, *, models, eps: float, steps: int,
                         seed: int = 0, progress=None, background_name: str | None = None) -> list[dict]:
    """protect.py --targets: optimise every target of `scan` against the CT-GAN pair in
    `models` and write real + d into `out` (the generator's protection, or the scan itself; int16
    holds d exactly: it is integer HU). background_name: the scan's file name, to first fill
    `out` with the signs background (background "signs"; None keeps `out`). Returns the info."""
    s = TargetSettings(eps=eps, steps=steps, seed=seed,
                       background="none" if background_name is None else "signs").validate()
    from procedures.attacker.pipeline import check_cube_fits  # lazy: SciPy, as load_attacker

    check_cube_fits(scan.hu.shape, scan.spacing, scan.source_path or "the scan")
    dt = load_attacker(models)
    if background_name is not None:
        hu = scan.hu.astype(np.float32)  # integer signs (a fractional eps rounds toward 0): <= eps stored
        out[...] = stored_as(hu + np.fix(background(scan.hu, s, background_name) - hu), out.dtype)
    info = []
    for i, box, d in optimise_targets(dt, scan.hu, scan.spacing, centres, s, progress,
                                      base=out.astype(np.float32)):
        out[box] = stored_as(scan.hu[box].astype(np.float32) + d, out.dtype)
        info.append(i)
    return info


