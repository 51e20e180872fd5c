"""The differentiable attack with step 8 against the Keras pipeline, on real models and scans
(docs/fidelity.md#the-differentiable-attack-with-step-8).

    python -m procedures.benchmarking.port_vs_keras --models models --data data/z2.5 -n 12

At the evaluation's held-out in-lung locations (procedures.evaluation.locations, seed 0),
inject and remove: procedures.attacker.pipeline.ScanManipulator (Keras) and
procedures.attacker.port.DifferentiableTamper(touchups="copy") tamper the same scan; the
absolute difference of the tampered scans is reported per port setting: float64 with the plain
clip (what the torch black-box attacker runs) and float32 with the straight-through clip (what
the optimisers run: targeted protection, the ceiling, the white-box loss).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from utils.errors import CliParser, run_cli


def compare(models, data, n: int, seed: int = 0) -> dict:
    """{setting: [(max |diff|, 99.9% quantile over the footprint, mean over changed voxels)]}."""
    import torch

    from procedures.attacker.pipeline import ScanManipulator
    from procedures.attacker.port import DifferentiableTamper
    from procedures.evaluation.locations import sample_locations
    from scanDataset import ScanDataset

    keras = ScanManipulator(models)
    kinds = {"float64, plain clip": dict(clamp="plain", work_dtype=torch.float64),
             "float32, straight-through clip": dict(clamp="straight_through",
                                                    work_dtype=torch.float32)}
    ports = {k: DifferentiableTamper.from_model_dirs(f"{models}/INJ", f"{models}/REM",
                                                     resample="spline", touchups="copy", **kw)
             for k, kw in kinds.items()}
    scans = ScanDataset(data, cache=False)
    out: dict = {k: [] for k in ports}
    for i in range(len(scans)):
        item = scans[i]
        hu = item.scan.hu.astype(np.float32)
        for loc in sample_locations(item, n, seed=seed):
            a = hu.copy()
            sl = keras.tamper_volume(a, item.scan.spacing, loc.vox, loc.action)
            for k, dt in ports.items():
                with torch.no_grad():
                    b = dt(torch.from_numpy(hu), item.scan.spacing, loc.vox, loc.action).numpy()
                diff = np.abs(a.astype(np.float64) - b)
                changed = (a != hu) | (b != hu)
                out[k].append((diff.max(), np.quantile(diff[sl], 0.999), diff[changed].mean()))
    return out


def main(argv=None) -> int:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="models", help="CT-GAN models folder with INJ/ and REM/")
    p.add_argument("--data", default="data/z2.5", help="folder of scans (default data/z2.5)")
    p.add_argument("-n", type=int, default=12, help="locations per scan, each inject and remove")
    args = p.parse_args(argv)
    c0 = time.process_time()
    for k, rows in compare(args.models, args.data, args.n).items():
        r = np.array(rows)
        print(f"{k}: {len(r)} tampers; max |diff| {r[:, 0].max():.3f} HU (median over tampers "
              f"{np.median(r[:, 0]):.3f}); 99.9% quantile over the footprint, worst tamper "
              f"{r[:, 1].max():.4f} HU; mean over changed voxels {r[:, 2].mean():.5f} HU")
    print(f"{time.process_time() - c0:.0f} CPU-s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
