"""How much can a perturbation of eps HU disrupt CT-GAN? A per-location upper bound.

At each location (seeded in-lung voxels; inject and remove) the perturbation of the attacked
region is optimised directly, with no generator: d = eps * tanh(w), rounded to integer HU
(straight-through: what int16 storage keeps), Adam maximising
RMSE(CT-GAN(real + d), CT-GAN(real)) in the cube through the PyTorch CT-GAN port
(procedures.attacker.port, steps 1-7 of docs/attack.md#overview). A MITS-GAN generator protects a whole
scan in one pass without knowing where the attacker will tamper, so on the same location it
cannot do better than this; Gaussian noise of the same RMS is the floor. Slow (a forward and a
backward of CT-GAN per step) and location-specific: a yardstick, not a protection method.

    python -m procedures.protection.bound --scan data/z2.5/lung1.mhd --models models --eps 10 -n 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from procedures.protection.targeted import TargetSettings, load_attacker, optimise_target
from utils.atomic import atomic_write_text
from utils.cli import cli_main
from utils.errors import CliParser, UsageError, run_cli
from utils.scan_io import load_scan


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


def bound_at(dt, hu: np.ndarray, spacing, center, action: str, *, eps: float, steps: int,
             lr: float, seed: int) -> dict:
    """Optimise one location. hu: the scan (D, H, W) in HU; center: (z, y, x) voxel.
    procedures.protection.targeted's optimiser with no centre offsets and one action."""
    s = TargetSettings(eps=eps, steps=steps, lr=lr, radius=0, offsets_per_step=1, actions=(action,),
                       seed=seed, method="adam")
    box, d = optimise_target(dt, hu, spacing, center, s.validate())
    real = torch.from_numpy(hu[box].astype(np.float32))
    c = tuple(int(v) - b.start for v, b in zip(center, box))
    d = torch.from_numpy(d)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ref, region = dt.footprints(real, spacing, c, action)[0]
        dis = _rmse(dt.footprints(real + d, spacing, c, action)[0][0], ref)
        pert = d[region].pow(2).mean().sqrt().item()
        noise = torch.round(torch.randn(real.shape, generator=g) * pert)
        dis_noise = _rmse(dt.footprints(real + noise, spacing, c, action)[0][0], ref)
    return {"z": int(center[0]), "y": int(center[1]), "x": int(center[2]), "action": action,
            "disruption_rmse_hu": dis, "perturbation_rms_cube_hu": pert,
            "perturbation_max_hu": d.abs().max().item(),
            "amplification": dis / pert if pert > 0 else float("nan"),
            "noise_disruption_rmse_hu": dis_noise, "attack_rmse_hu": _rmse(ref, real[region])}


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(
        prog="python -m procedures.protection.bound",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scan", required=True, help="a scan (.mhd, .nrrd, .nii, DICOM folder)")
    p.add_argument("--models", default="models", help="folder with INJ/ and REM/ CT-GAN models")
    p.add_argument(
        "--eps", type=float, default=10.0, help="bound in HU on every voxel (default 10)"
    )
    p.add_argument("--steps", type=int, default=40, help="Adam steps per location (default 40)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate on w (default 0.1)")
    p.add_argument("-n", "--n-locations", type=int, default=3, help="in-lung locations (default 3)")
    p.add_argument("--actions", default="inject,remove")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the rows and their means to this JSON file")
    return p


@cli_main(build_parser)
def main(args) -> int:
    if args.eps <= 0 or args.steps < 1 or args.n_locations < 1:
        raise UsageError("--eps must be > 0, --steps and -n >= 1")
    actions = [a.strip() for a in args.actions.split(",") if a.strip()]
    if not actions or any(a not in ("inject", "remove") for a in actions):
        raise UsageError(f"--actions: inject and/or remove, not {args.actions!r}")
    from procedures.evaluation.locations import (
        sample_locations,
    )  # lazy: evaluation pulls SciPy (keeps --help light)

    scan = load_scan(args.scan)
    models = Path(args.models)
    dt = load_attacker(models, actions, touchups="none")  # steps 1-7: measured on the cut below
    item = SimpleNamespace(path=str(args.scan), scan=scan)
    locs = sample_locations(item, args.n_locations, seed=args.seed, actions=actions)
    rows = []
    for i, loc in enumerate(locs):
        t0 = time.perf_counter()
        r = bound_at(dt, scan.hu, scan.spacing, loc.vox, loc.action, eps=args.eps, steps=args.steps,
                     lr=args.lr, seed=args.seed * 1000 + i)
        rows.append(r)
        print(
            f"{loc.action:6s} at {loc.vox}: disruption {r['disruption_rmse_hu']:.1f} HU with "
            f"{r['perturbation_rms_cube_hu']:.2f} HU RMS (amplification {r['amplification']:.1f}); "
            f"noise of that RMS {r['noise_disruption_rmse_hu']:.1f} HU; attack {r['attack_rmse_hu']:.1f} HU "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    keys = (
        "disruption_rmse_hu",
        "perturbation_rms_cube_hu",
        "amplification",
        "noise_disruption_rmse_hu",
        "attack_rmse_hu",
    )
    means = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    print("mean: " + ", ".join(f"{k} {v:.2f}" for k, v in means.items()))
    if args.out:
        atomic_write_text(
            Path(args.out),
            json.dumps({"args": vars(args), "rows": rows, "mean": means}, indent=1) + "\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
