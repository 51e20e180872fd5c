"""The ceiling of protection anywhere: what one bounded perturbation per scan can do against
CT-GAN at locations it was not optimised for
(docs/results.md, "The ceiling of protection anywhere").

    python -m procedures.protection.ceiling --data data/z2.5 --models models --eps 10 --steps N \
        --out runs/ceiling

One perturbation d per scan, |d| <= eps, integer HU (rounded in the forward pass,
straight-through), optimised directly through the differentiable CT-GAN attack with its noise
touch-ups (procedures.attacker.port, touchups="copy": the whole scan goes through step 8, so
the copied noise block is optimised as well) at fresh random in-lung locations every step, each
tampered with both actions, by the seen CT-GAN pair only. The loss is the evaluation's
disruption, RMSE(CT-GAN(real + d), CT-GAN(real)) in the 32 mm cube, averaged over the step's
tampers. Two optimisers, both from random +-eps signs, so step 0 is the random-signs baseline:
`pgd`, L-inf sign-gradient ascent on d (procedures.protection.targeted.pgd_step), which may move
voxels inside the ball; `vertex`, which keeps every voxel at exactly +-eps (d = eps * sign(w),
straight-through) and accumulates the normalised gradient in a score w, so a voxel flips sign
only when the gradients of the locations that read it agree over visits. Only the voxels a step's tampers read
(their reference cubes and the copy-noise block) are touched, so a step costs the same on any
scan size.

No generator learns anything here and nothing is location-specific at the end: any
location-agnostic protection of that scan at that eps (a MITS-GAN generator, noise, signs) is one
such d, so the held-out disruption this optimiser reaches estimates what such protection can
reach on that scan. Training locations come from their own stream (CEILING_STREAM), the
disruption-vs-steps curve is measured every K steps on a fixed set from another (CURVE_STREAM),
and evaluate.py (`--methods ceiling --ceiling-dir DIR`) measures the saved d at the evaluation's
locations (EVAL_STREAM) with both attackers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from procedures.attacker.model_dir import load_attacker_pair
from procedures.evaluation.locations import EVAL_STREAM, lung_candidates
from procedures.protection.targeted import pgd_step, rmse_hu
from utils.cli import cli_main
from utils.errors import CliParser, InputFileError, UsageError, run_cli

# Entropy tags of the location streams (the evaluation's is EVAL_STREAM): training and the
# curve's held-out set never draw what the evaluation draws.
CEILING_STREAM = 0x4345494C
CURVE_STREAM = 0x43555256
assert len({CEILING_STREAM, CURVE_STREAM, EVAL_STREAM}) == 3
METHODS = ("pgd", "vertex")


@dataclass
class CeilingSettings:
    eps: float = 10.0                # L-inf bound in HU (integer HU as stored)
    steps: int = 3000                # optimisation steps per scan (docs/results.md: flat by then)
    lr: float = 0.5                  # first step (pgd: a fraction of eps; vertex: of the score
                                     # margin 1), decaying linearly to a tenth
    locations_per_step: int = 1      # fresh in-lung locations per step, each with every action
    actions: tuple = ("inject", "remove")
    seed: int = 0
    eval_every: int = 25             # held-out curve every K steps (and at the first and last)
    curve_locations: int = 4         # fixed held-out locations per scan for the curve
    method: str = "vertex"           # "vertex" (every voxel +-eps) or "pgd" (inside the ball)

    def validate(self) -> "CeilingSettings":
        if not 0 < self.eps <= 127:
            raise UsageError("ceiling: eps must be in (0, 127] HU (stored as int8)")
        counts = (self.steps, self.locations_per_step, self.eval_every, self.curve_locations)
        if min(counts) < 1:
            raise UsageError("ceiling: steps, locations per step, eval_every and curve locations "
                             "must be >= 1")
        if not self.lr > 0:
            raise UsageError("ceiling: lr must be > 0")
        if self.method not in METHODS:
            raise UsageError(f"ceiling: method must be one of {', '.join(METHODS)}, "
                             f"not {self.method!r}")
        if not self.actions or any(a not in ("inject", "remove") for a in self.actions):
            raise UsageError(f"ceiling: actions must be inject and/or remove, not {self.actions!r}")
        return self


def location_stream(hu: np.ndarray, spacing, name: str, seed: int, stream: int = CEILING_STREAM):
    """An endless generator of in-lung voxels (z, y, x) drawn with replacement from
    procedures.evaluation.locations.lung_candidates, seeded by (stream, seed, scan name)."""
    cand = lung_candidates(hu, spacing, 1, name)
    rng = np.random.default_rng([int(stream), int(seed), zlib.crc32(Path(name).name.encode())])
    while True:
        yield tuple(int(v) for v in cand[rng.integers(len(cand))])


class CeilingOptimiser:
    """The perturbation of one scan and its optimisation through `dt`, a DifferentiableTamper
    with touchups="copy" (the seen pair)."""

    def __init__(self, dt, hu: np.ndarray, spacing, name: str, s: CeilingSettings,
                 init: np.ndarray | None = None):
        if dt.touchups != "copy":
            raise UsageError("the ceiling optimises through the whole attack: touchups='copy'")
        self.dt, self.spacing, self.s = dt, tuple(float(v) for v in spacing), s.validate()
        self.real = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))
        self.dims = tuple(int(n) for n in hu.shape)
        tag = zlib.crc32(Path(name).name.encode())
        g = torch.Generator().manual_seed(
            int(np.random.default_rng([CEILING_STREAM, s.seed, tag, 1]).integers(2 ** 62)))
        signs = 2.0 * torch.randint(0, 2, self.dims, generator=g, dtype=torch.int8).float() - 1.0
        # pgd: w is d itself; vertex: w is a score of margin 1 whose sign picks +-eps
        self.w = signs * (float(s.eps) if s.method == "pgd" else 1.0)
        if init is not None:  # continue from a saved d (vertex: its signs, margin 1 again)
            d0 = torch.from_numpy(np.asarray(init, dtype=np.float32))
            self.w = d0 if s.method == "pgd" else torch.where(d0 >= 0, 1.0, -1.0)
        self.train_stream = location_stream(hu, spacing, name, s.seed, CEILING_STREAM)
        curve = location_stream(hu, spacing, name, s.seed, CURVE_STREAM)
        self.curve_set = [next(curve) for _ in range(s.curve_locations)]
        self.curve_refs = self._tamper(self.real, self.curve_set)
        self.seen: list[tuple[int, int, int]] = []    # every training centre (tests, reports)

    def _jobs(self, centres):
        acts = list(self.s.actions)
        return np.repeat(np.asarray(centres), len(acts), axis=0), acts * len(centres)

    def _run(self, window: torch.Tensor, box, centres) -> list[torch.Tensor]:
        """The tampered 32 mm cubes of every centre and action, from a window of the scan."""
        cents, actions = self._jobs(centres)
        frame = ([b.start for b in box], self.dims)
        feet = self.dt.tampered(window.expand(len(cents), *window.shape), self.spacing, cents,
                                actions, frame=frame)
        return [f[0] for f in feet]

    def _tamper(self, vol: torch.Tensor | None, centres) -> list[torch.Tensor]:
        """Without gradient, one location at a time: `vol` (the real scan) or, with None, the
        scan protected by the current d."""
        out = []
        with torch.no_grad():
            for c in centres:
                box = self.dt.window(self.spacing, [c], self.dims)
                win = vol[box] if vol is not None else self.real[box] + self._d(self.w[box])
                out += self._run(win, box, [c])
        return out

    def step(self, t: int) -> float:
        """One sign-gradient step at fresh locations; returns their mean disruption (HU)."""
        from procedures.protection.whitebox import straight_through_round  # the one ST rounding

        centres = [next(self.train_stream) for _ in range(self.s.locations_per_step)]
        self.seen += centres
        box = self.dt.window(self.spacing, centres, self.dims)
        with torch.no_grad():
            refs = self._run(self.real[box], box, centres)
        w = self.w[box].clone().requires_grad_(True)
        if self.s.method == "pgd":
            d = straight_through_round(w)
        else:  # +-eps in the forward pass, the gradient passed straight to the score
            d = straight_through_round(w + (self._d(w) - w).detach())
        feet = self._run(self.real[box] + d, box, centres)
        disruption = torch.stack([rmse_hu(f, r) for f, r in zip(feet, refs)]).mean()
        (-disruption).backward()
        with torch.no_grad():
            if self.s.method == "pgd":
                pgd_step(w, w.grad, self.s.eps, self.s.lr, t, self.s.steps)
            else:
                self._vertex_step(w, w.grad, t)
            self.w[box] = w
        return float(disruption.detach())

    def _d(self, w: torch.Tensor) -> torch.Tensor:
        """The integer perturbation of a score / latent w (no gradient)."""
        if self.s.method == "pgd":
            return torch.round(w)
        return torch.round(torch.where(w >= 0, self.s.eps, -self.s.eps))

    def _vertex_step(self, w: torch.Tensor, grad: torch.Tensor, t: int) -> None:
        """Ascent on the score: the gradient normalised to mean |g| = 1 over the voxels it
        reaches, times lr (decaying linearly to a tenth); a voxel's score starts at +-1, so it
        flips after about 1 / lr visits whose gradients agree against its sign."""
        reached = grad != 0
        if not bool(reached.any()):
            return
        scale = grad[reached].abs().mean()
        w -= self.s.lr * (1.0 - 0.9 * t / self.s.steps) * grad / scale

    def heldout(self) -> float:
        """Mean disruption (HU) of the current d on the curve's fixed held-out set."""
        got = self._tamper(None, self.curve_set)
        return float(torch.stack([rmse_hu(a, b) for a, b in zip(got, self.curve_refs)]).mean())

    def perturbation(self) -> np.ndarray:
        """The integer perturbation d (int8, |d| <= eps)."""
        return self._d(self.w).to(torch.int8).numpy()


def optimise_scan(dt, hu: np.ndarray, spacing, name: str, s: CeilingSettings, progress=None,
                  on_point=None, init: np.ndarray | None = None):
    """Optimise one scan. Returns (d int8, curve dict: steps, train and held-out disruption).
    on_point(d, curve), when given, is called at every curve point (to save a run that may be
    stopped before its last step). `init`: start from this d instead of random signs (the
    training locations are drawn anew from the same stream: use another --seed to continue)."""
    opt = CeilingOptimiser(dt, hu, spacing, name, s, init=init)
    curve = {"step": [0], "heldout_hu": [opt.heldout()], "train_hu": [float("nan")]}
    recent: list[float] = []
    it = range(s.steps)
    bar = None if progress is None else progress(it, desc=f"ceiling {Path(name).name}", unit="step")
    for t in (it if bar is None else bar):
        recent.append(opt.step(t))
        if (t + 1) % s.eval_every == 0 or t + 1 == s.steps:
            curve["step"].append(t + 1)
            curve["heldout_hu"].append(opt.heldout())
            curve["train_hu"].append(float(np.mean(recent)))
            recent = []
            if bar is not None:
                bar.set_postfix(train=f"{curve['train_hu'][-1]:.1f}",
                                heldout=f"{curve['heldout_hu'][-1]:.1f}")
            if on_point is not None:
                on_point(opt.perturbation(),
                         {**curve, "curve_locations": [list(c) for c in opt.curve_set]})
    curve["curve_locations"] = [list(c) for c in opt.curve_set]
    return opt.perturbation(), curve


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = CeilingSettings()
    p.add_argument("--data", default="data/z2.5", help="folder of scans (default data/z2.5)")
    p.add_argument("--models", default="models",
                   help="the seen CT-GAN pair (INJ/, REM/); never give the held-out pair here")
    p.add_argument("--out", default="runs/ceiling", help="output folder (default runs/ceiling)")
    p.add_argument("--eps", type=float, default=d.eps,
                   help=f"L-inf bound in HU (default {d.eps:g})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"steps per scan (default {d.steps})")
    p.add_argument("--lr", type=float, default=d.lr,
                   help=f"first step (pgd: a fraction of eps; vertex: of the score margin 1), decaying to a tenth "
                        f"(default {d.lr:g})")
    p.add_argument("--locations-per-step", type=int, default=d.locations_per_step,
                   help="fresh in-lung locations per step, each injected and removed (default 1)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"held-out curve point every K steps (default {d.eval_every})")
    p.add_argument("--curve-locations", type=int, default=d.curve_locations,
                   help=f"fixed held-out locations per scan for the curve "
                        f"(default {d.curve_locations})")
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="pgd: sign-gradient steps inside the ball; vertex: every voxel stays at "
                        "exactly +-eps, flipped by accumulated gradients (default vertex, the better one measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="",
                   help="start from the perturbations saved in this folder (a run's --out) "
                        "instead of random signs; give another --seed for fresh locations")
    p.add_argument("--max-scans", type=int, default=0, help="only the first N scans (0 = all)")
    p.add_argument("--scans", default="",
                   help="only these scan file names, comma-separated (runs on several scans can "
                        "share --out: each writes its own <scan>.npy and <scan>.json)")
    p.add_argument("--no-progress", action="store_true")
    return p


@cli_main(build_parser)
def main(args) -> int:
    from tqdm import tqdm

    from scanDataset import ScanDataset
    from utils.atomic import atomic_path, atomic_write_text, check_output_dir

    s = CeilingSettings(eps=args.eps, steps=args.steps, lr=args.lr, seed=args.seed,
                        locations_per_step=args.locations_per_step, eval_every=args.eval_every,
                        curve_locations=args.curve_locations, method=args.method).validate()
    if args.seed < 0 or args.max_scans < 0:
        raise UsageError("--seed and --max-scans must be >= 0")
    out = Path(args.out)
    check_output_dir(out)
    if args.init and Path(args.init).resolve() == out.resolve():
        raise UsageError("--init must differ from --out (a run never overwrites its start)")
    data = ScanDataset(args.data, cache=False)
    names = [Path(p).name for p in data.paths]
    wanted = [n.strip() for n in args.scans.split(",") if n.strip()]
    if set(wanted) - set(names):
        missing = ", ".join(sorted(set(wanted) - set(names)))
        raise UsageError(f"--scans: {missing} not in {args.data}")
    todo = [i for i, n in enumerate(names) if not wanted or n in wanted]
    todo = todo[:args.max_scans] if args.max_scans else todo
    dt = load_attacker_pair(args.models, touchups="copy")  # the seen pair, step 8 in the graph
    out.mkdir(parents=True, exist_ok=True)
    for i in todo:
        item = data[i]
        name = names[i]
        c0, w0 = time.process_time(), time.perf_counter()

        def save(d, curve):  # at every curve point: a stopped run keeps its last point
            with atomic_path(perturbation_path(out, name)) as tmp:
                np.save(tmp, d)
            report = {"scan": name, "settings": {**asdict(s), "actions": list(s.actions)},
                      "init": str(args.init) if args.init else None,
                      "models": str(args.models), "data": str(args.data),
                      "torch_threads": torch.get_num_threads(), **curve,
                      "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0,
                      "shape": list(d.shape), "max_abs_hu": int(np.abs(d).max())}
            atomic_write_text(perturbation_path(out, name).with_suffix(".json"),
                              json.dumps(report, indent=1))
            return report

        init = (load_perturbation(args.init, name, item.scan.hu.shape, s.eps) if args.init
                else None)
        d, curve = optimise_scan(dt, item.scan.hu, item.scan.spacing, name, s,
                                 progress=None if args.no_progress else tqdm, on_point=save,
                                 init=init)
        report = save(d, curve)
        print(f"{name}: held-out disruption {curve['heldout_hu'][0]:.1f} HU (random signs, "
              f"step 0) -> {curve['heldout_hu'][-1]:.1f} HU after {s.steps} steps; "
              f"{report['cpu_s']:.0f} CPU-s")
    print(f"wrote {len(todo)} perturbation(s) and their curves to {out}")
    return 0


def perturbation_path(folder, scan_name) -> Path:
    """Where main() saves the perturbation of a scan: <folder>/<scan stem>.npy."""
    return Path(folder) / f"{Path(scan_name).name.split('.')[0]}.npy"


def load_perturbation(folder, scan_name, shape, eps: float | None = None) -> np.ndarray:
    """The saved int8 perturbation of a scan, checked (shape, integers, |d| <= eps)."""
    p = perturbation_path(folder, scan_name)
    if not p.is_file():
        raise InputFileError(f"{p}: no ceiling perturbation for {scan_name} "
                             f"(python -m procedures.protection.ceiling --out {folder})")
    try:
        d = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputFileError(f"{p}: not a NumPy array ({type(e).__name__})") from None
    if d.dtype.kind not in "iu" or tuple(d.shape) != tuple(shape):
        raise InputFileError(f"{p}: expected an integer array of shape {tuple(shape)}, got "
                             f"{d.dtype} {tuple(d.shape)}")
    if eps is not None and np.abs(d.astype(np.int32)).max() > eps:
        raise InputFileError(f"{p}: |d| exceeds eps {eps:g} HU")
    return d


if __name__ == "__main__":
    sys.exit(run_cli(main))
