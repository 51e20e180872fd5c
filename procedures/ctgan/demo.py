"""CT-GAN demo: tamper each real scan at its own locations and draw before/after.

    python -m procedures.ctgan.demo [--data data/z2.5] [--models models] [--out runs/demo]

For every scan in the folder: remove its labelled nodule (nodules.csv) and inject a nodule at
its first healthy location (healthy.csv). Writes the tampered scans (`<name>_tampered.mhd`),
and `ctgan_before_after.png`: the middle slice of each tampered cube, before | after | after -
before, in HU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from utils.cli import cli_main
from utils.errors import CliParser, UsageError, run_cli
from utils.images import save_grid
from utils.locations_csv import read_locations_csv
from utils.scan_io import Scan, load_scan, save_mhd
from utils.stored import stored_as



def read_locations(csv_path: Path) -> dict[str, list[tuple[int, int, int]]]:
    """filename -> voxel (z, y, x) list, from a CSV written by procedures.data.prepare."""
    out: dict[str, list[tuple[int, int, int]]] = {}
    for row in read_locations_csv(csv_path, need_filename=True):
        if row.world:
            raise UsageError(f"{csv_path}: line {row.line}: the demo reads voxel coordinates only")
        out.setdefault(row.filename, []).append(tuple(int(v) for v in row.zyx))
    return out


def build_parser() -> CliParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/z2.5")
    p.add_argument("--models", default="models")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--backend", default=None, choices=("tensorflow", "torch"))
    return p


@cli_main(build_parser)
def main(args) -> int:

    from procedures.attacker.pipeline import (
        ScanManipulator,
    )  # lazy: SciPy/Keras plumbing after --help

    data, out = Path(args.data), Path(args.out)
    nodules = read_locations(data / "nodules.csv")
    healthy = read_locations(data / "healthy.csv")
    out.mkdir(parents=True, exist_ok=True)
    manip = ScanManipulator(args.models, backend=args.backend)
    cols: dict[str, list] = {"before": [], "after": [], "difference": []}
    for name in sorted(nodules):
        scan = load_scan(data / name)
        vol = scan.hu.astype(np.float32)
        jobs = [("remove", nodules[name][0])] + [("inject", healthy[name][0])] * bool(
            healthy.get(name)
        )
        for action, coord in jobs:
            before = vol[coord[0]].copy()
            t0 = time.perf_counter()
            manip.tamper_volume(vol, scan.spacing, coord, action, np.random.default_rng(0))
            dt = time.perf_counter() - t0
            z, y, x = coord
            h = int(round(32 / scan.spacing[1]))  # the cube's in-plane size at this spacing
            win = (slice(max(0, y - h), y + h), slice(max(0, x - h), x + h))
            cols["before"].append(before[win])
            cols["after"].append(vol[z][win].copy())
            cols["difference"].append(cols["after"][-1] - cols["before"][-1])
            print(f"{name}: {action} at voxel {coord} in {dt * 1000:.0f} ms")
        tampered = Scan(stored_as(vol, np.int16), scan.spacing,
                        scan.origin, scan.direction)
        save_mhd(tampered, out / f"{Path(name).stem}_tampered.mhd")
    fig = out / "ctgan_before_after.png"
    save_grid(fig, cols, title="CT-GAN: remove the labelled nodule, inject at a healthy point "
              "(middle slice of each tampered cube)")
    print(f"wrote {fig}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
