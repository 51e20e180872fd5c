"""Protect a CT scan with a trained MITS-GAN generator.

    python protect.py data/z2.5/lung1.mhd -c runs/demo/checkpoint.pt -o protected/
    python protect.py dicom_series_folder/ -c runs/demo/checkpoint.pt --format dicom -o out/
    python protect.py data/z2.5/lung1.mhd --targets data/z2.5/nodules.csv -o protected/

--targets protects known findings: around each row the perturbation (|d| <= --eps HU, integer)
is optimised against CT-GAN's removal and injection with the cube centre up to 2 voxels off
(procedures.protection.targeted; docs/results.md has what it achieves); the generator (-c), or random
+-eps signs (--background signs, the default) or nothing (--background none) protects the rest.

Reads a MetaImage (.mhd), NRRD/NIfTI file or a DICOM series folder; writes the protected scan in
HU with the source geometry (and, for DICOM, the source's patient/study metadata):
  -o ending in .mhd     that file (with its .raw)
  -o anything else      a folder: <name>_protected.mhd, or the DICOM series <name>_protected/
Prints the perturbation size (RMS and max |protected - original|, HU). The scan is processed in
slabs (procedures.protection.apply.protect_hu, no autograd): memory is the scan twice (int16) plus one
batch of the generator's activations plus PyTorch itself; a 121 x 512 x 512 scan with the
width-32 U-Net at --batch 4 peaks at 1.6 GB RSS on the CPU (docs/performance.md).
Never writes over the input; outputs appear complete or not at all.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from utils.cli import cli_main
from utils.errors import CliParser, OutputError, UsageError, run_cli
# lazy: procedures.* (torch, SciPy), tqdm and the scan I/O are imported inside the functions
# that use them, so --help and argument errors answer at once without loading torch.



def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scan", help="scan to protect: .mhd/.mha/.nrrd/.nii(.gz) file or DICOM series folder")
    p.add_argument("-c", "--checkpoint", default="",
                   help="MITS-GAN checkpoint (train.py's checkpoint.pt); optional with --targets")
    p.add_argument("--targets", default="",
                   help="CSV of known findings (z,y,x[,coord vox|world][,filename]): optimise the "
                        "perturbation around each against CT-GAN removal and injection "
                        "(procedures.protection.targeted); the generator (or nothing) elsewhere")
    p.add_argument("--eps", type=float, default=10.0, help="--targets: L-inf bound in HU (default 10)")
    p.add_argument("--models", default="models", help="--targets: CT-GAN folder with INJ/ and REM/")
    p.add_argument("--targeted-steps", type=int, default=120, help="--targets: Adam steps per target (default 120)")
    p.add_argument("--background", choices=["signs", "none"], default="signs",
                   help="--targets without -c: random +-eps signs (seeded by --seed) or nothing outside "
                        "the targets (default signs; docs/results.md section 2)")
    p.add_argument("-o", "--out", default="protected",
                   help="output .mhd file, or a folder (default: protected/)")
    p.add_argument("--format", choices=["mhd", "dicom"], default=None,
                   help="output format (default: dicom for a DICOM input, else mhd)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    p.add_argument("--batch", type=int, default=4, help="slabs per generator call (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator's noise input (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def output_path(scan_path: Path, out: Path, fmt: str) -> Path:
    """The .mhd file or DICOM series folder to write."""
    from utils.scan_paths import scan_stem

    if fmt == "mhd" and out.suffix.lower() == ".mhd":
        return out
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot write {out}: exists and is not a folder")
    name = f"{scan_stem(scan_path)}_protected"
    return out / (name + ".mhd" if fmt == "mhd" else name)


def check_output(scan_path: Path, out_path: Path) -> None:
    """Refuse any output file that is a file the input reads (its header's data file included)."""
    from utils.scan_io import refuse_overwrite

    refuse_overwrite(out_path, scan_path)


def check_args(args) -> None:
    """The options' own ranges (exit 2), before any file is read."""
    if args.batch < 1:
        raise UsageError("--batch must be >= 1")
    if args.seed < 0:
        raise UsageError("--seed must be >= 0")
    if not args.checkpoint and not args.targets:
        raise UsageError("give a checkpoint (-c), --targets CSV, or both")
    if args.targets and (not args.eps > 0 or args.targeted_steps < 1):
        raise UsageError("--eps must be > 0 and --targeted-steps >= 1")


def check_fits(scan, scan_path: Path, G, cfg, centres) -> None:
    """Each operation's minimum size (utils.scan.check_min_size), before any work: the
    generator's slabs, CT-GAN's cube around the targets (docs/safety.md#what-a-scan-may-be)."""
    if G is not None:
        from procedures.protection.apply import check_generator_fits
        check_generator_fits(G, cfg.slab, scan.hu, scan_path)
    if centres:
        from procedures.attacker.pipeline import check_cube_fits
        check_cube_fits(scan.shape, scan.spacing, scan_path)


def write(result, target: Path, fmt: str) -> Path:
    """The protected scan as MetaImage or a DICOM series (atomically, never over the input)."""
    from utils.atomic import os_error_message
    from utils.scan_io import save_dicom_series, save_mhd

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(os_error_message(target.parent, e)) from None
    if fmt == "mhd":
        return save_mhd(result, target)
    return save_dicom_series(result, target, series_description="MITS-GAN protected")


@cli_main(build_parser)
def main(args) -> int:
    check_args(args)
    from tqdm import tqdm

    from procedures.protection.apply import load_generator, protect_hu, scan_with_hu
    from utils.device import pick_device
    from utils.atomic import check_output_dir
    from utils.metrics import perturbation_stats
    from utils.scan_io import load_scan

    scan_path = Path(args.scan)
    device = pick_device(args.device)
    # The checkpoint and the targets are checked before the (possibly large) scan is read.
    G, cfg, dtype = load_generator(args.checkpoint, device) if args.checkpoint else (None, None, None)
    if args.targets:
        from procedures.protection.targeted import read_target_rows, targets_for_scan
        rows = read_target_rows(args.targets)
    fmt = args.format or ("dicom" if scan_path.is_dir() else "mhd")
    target = output_path(scan_path, Path(args.out), fmt)
    check_output(scan_path, target)
    check_output_dir(target.parent)  # a read-only or impossible folder fails before the work

    scan = load_scan(scan_path)
    depth = scan.hu.shape[0]
    centres = targets_for_scan(rows, scan, scan_path.name) if args.targets else []
    check_fits(scan, scan_path, G, cfg, centres)
    hu = scan.hu
    out = np.empty(hu.shape, dtype=hu.dtype if np.issubdtype(hu.dtype, np.integer) else np.float32)
    t0 = time.perf_counter()
    if G is not None:
        protect_hu(G, hu, cfg, device, dtype=dtype, seed=args.seed, batch=args.batch, out=out,
                   progress=None if args.no_progress else tqdm, desc=f"protect {scan_path.name}")
    else:
        out[...] = hu
    if centres:
        from procedures.protection.targeted import protect_scan_targets
        protect_scan_targets(scan, centres, out, models=args.models, eps=args.eps, steps=args.targeted_steps,
                             seed=args.seed, progress=None if args.no_progress else tqdm,
                             background_name=scan_path.name if G is None and args.background == "signs" else None)
    seconds = time.perf_counter() - t0
    stats = perturbation_stats(out, hu)

    written = write(dataclasses.replace(scan_with_hu(scan, out), source_path=str(scan_path)),
                    target, fmt)
    how = [f"{cfg.generator} generator"] if G is not None else []
    how += [f"{len(centres)} target(s), eps {args.eps:g} HU"] if centres else []
    print(f"protected {scan_path} -> {written} ({depth} slices in {seconds:.1f} s on {device}, "
          f"{' + '.join(how)})")
    print(f"perturbation: RMS {stats['rms_hu']:.2f} HU, max {stats['max_hu']:.1f} HU, "
          f"{100 * stats['changed_fraction']:.1f}% of voxels changed")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
