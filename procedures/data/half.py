"""The scans at half in-plane resolution, for CPU-sized experiments (docs/results.md, "Transfer by
ensemble" and "TAFIM on CT"; docs/training.md, "Untargeted protection: what each lever does").

    python -m procedures.data.half --data data/z2.5 --out data/half      # or: make data-half

Each scan's slices are averaged over 2 x 2 blocks (skimage.measure.block_reduce; an odd last row
or column is dropped), rounded to integer HU (int16), in-plane spacing doubled, z, origin and
direction kept; the location CSVs are not carried over (evaluate.py draws its own in-lung
locations). Writing is atomic; an existing output is verified, not rewritten.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from utils.cli import cli_main
from utils.errors import CliParser, OutputError, UsageError, run_cli

FACTOR = 2


def halve(scan):
    """A new Scan: `scan` averaged over FACTOR x FACTOR in-plane blocks, int16 HU."""
    from skimage.measure import block_reduce

    from utils.scan import Scan
    from utils.stored import stored_as

    z, y, x = scan.hu.shape
    hu = scan.hu[:, :y - y % FACTOR, :x - x % FACTOR].astype(np.float64)
    mean = block_reduce(hu, (1, FACTOR, FACTOR), np.mean)
    spacing = np.asarray(scan.spacing, dtype=np.float64) * (1, FACTOR, FACTOR)
    return Scan(stored_as(mean, np.int16), spacing, scan.origin, scan.direction)


def build_parser() -> CliParser:
    p = CliParser(prog="python -m procedures.data.half", description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/z2.5", type=Path, help="input folder (default data/z2.5)")
    p.add_argument("--out", default="data/half", type=Path, help="output folder (default data/half)")
    return p


@cli_main(build_parser)
def main(args) -> int:
    from scanDataset import list_scans
    from utils.scan_io import load_scan, save_mhd

    if args.out.resolve() == args.data.resolve():
        raise UsageError("--out must differ from --data (inputs are never overwritten)")
    if args.out.exists() and not args.out.is_dir():
        raise OutputError(f"{args.out}: exists and is not a folder")
    paths = list_scans(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    for p in paths:
        target = args.out / (Path(p).name.split(".")[0] + ".mhd")
        half = halve(load_scan(p))
        if target.is_file():
            old = load_scan(target)
            if np.array_equal(old.hu, half.hu) and np.allclose(old.spacing, half.spacing):
                print(f"{target}: present and equal; kept")
                continue
            raise OutputError(f"{target}: exists with other content; remove it first")
        save_mhd(half, target)
        print(f"wrote {target} {half.hu.shape[::-1]} (x, y, z), spacing "
              f"{' x '.join(f'{v:g}' for v in half.spacing[::-1])} mm")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
