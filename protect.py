"""Protect a CT scan with a trained MITS-GAN generator.

    python protect.py data/z2.5/lung1.mhd -c runs/demo/checkpoint.pt -o protected/
    python protect.py dicom_series_folder/ -c runs/demo/checkpoint.pt --format dicom -o out/
    python protect.py data/z2.5/lung1.mhd --targets data/z2.5/nodules.csv -o protected/

--targets protects known findings: around each row the perturbation (|d| <= --eps HU, integer)
is optimised against CT-GAN's removal and injection with the cube centre up to 2 voxels off
(procedures.protection.targeted; docs/results.md has what it achieves); the generator (-c), or random
+-eps signs (--background signs, the default) or nothing (--background none) protects the rest.

--seal KEYFILE seals the result (docs/seal.md): the least significant bit of the stored HU carries a
keyed MAC per 8 x 8 block, so that verify.py finds and maps any later change. It adds at most 1 HU
per voxel and keeps the total within --eps (or the generator's bound); with neither -c nor
--targets, the scan is sealed only:
    python verify.py --make-key seal.key
    python protect.py data/z2.5/lung1.mhd --seal seal.key -o sealed/

Reads a MetaImage (.mhd), NRRD/NIfTI file, .npy or a DICOM series folder; writes the protected
scan in HU with the source geometry (and, for DICOM, the source's patient/study metadata):
  -o ending in .mhd, .nrrd, .nii, .nii.gz or .npy   that file (.mhd with its .raw, .npy with .json)
  -o anything else      a folder: <name>_protected.mhd (or .nrrd, .nii.gz, .npy: --format), or
                        the DICOM series <name>_protected/
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

_SUFFIX = {"mhd": ".mhd", "nrrd": ".nrrd", "nifti": ".nii.gz", "numpy": ".npy"}


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scan", help="scan to protect: .mhd/.mha/.nrrd/.nii(.gz)/.npy file or DICOM "
                                "series folder")
    p.add_argument("-c", "--checkpoint", default="",
                   help="MITS-GAN checkpoint (train.py's checkpoint.pt); optional with --targets "
                        "or --seal")
    p.add_argument("--targets", default="",
                   help="CSV of known findings (z,y,x[,coord vox|world][,filename]): optimise the "
                        "perturbation around each against CT-GAN removal and injection "
                        "(procedures.protection.targeted); the generator (or nothing) elsewhere")
    p.add_argument(
        "--eps", type=float, default=10.0, help="--targets: L-inf bound in HU (default 10)"
    )
    p.add_argument("--models", default="models", help="--targets: CT-GAN folder with INJ/ and REM/")
    p.add_argument(
        "--targeted-steps",
        type=int,
        default=120,
        help="--targets: Adam steps per target (default 120)",
    )
    p.add_argument(
        "--background",
        choices=["signs", "none"],
        default="signs",
        help="--targets without -c: random +-eps signs (seeded by --seed) or nothing outside "
        "the targets (default signs; docs/results.md section 2)",
    )
    p.add_argument("--seal", default="", metavar="KEYFILE",
                   help="seal the output with this key (verify.py --make-key; docs/seal.md)")
    p.add_argument("--block-size", type=int, default=8,
                   help="--seal: block side in voxels (default 8)")
    p.add_argument("-o", "--out", default="protected",
                   help="output file (.mhd, .nrrd, .nii, .nii.gz, .npy), or a folder "
                        "(default: protected/)")
    p.add_argument("--format", choices=["mhd", "nrrd", "nifti", "numpy", "dicom"], default=None,
                   help="output format (default: from -o's suffix; dicom for a DICOM input, "
                        "else mhd)")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N"
    )
    p.add_argument("--batch", type=int, default=4, help="slabs per generator call (default 4)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the generator's noise input (default 0)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _file_format(out: Path) -> str | None:
    name = out.name.lower()
    for fmt, suffixes in (("mhd", (".mhd",)), ("nrrd", (".nrrd",)), ("nifti", (".nii", ".nii.gz")),
                          ("numpy", (".npy",))):
        if name.endswith(suffixes):
            return fmt
    return None


def output_path(scan_path: Path, out: Path, fmt: str) -> Path:
    """The file or DICOM series folder to write."""
    from utils.scan_paths import scan_stem

    if fmt != "dicom" and _file_format(out) == fmt:
        return out
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot write {out}: exists and is not a folder")
    name = f"{scan_stem(scan_path)}_protected"
    return out / (name + _SUFFIX[fmt] if fmt != "dicom" else name)


def check_output(scan_path: Path, out_path: Path) -> None:
    """Refuse any output file that is a file the input reads (its header's data file included)."""
    from utils.scan_io import refuse_overwrite

    refuse_overwrite(out_path, scan_path)


def check_fits(scan, scan_path: Path, G, cfg, centres) -> None:
    """Each operation's minimum size (utils.scan.check_min_size), before any work: the
    generator's slabs, CT-GAN's cube around the targets (docs/safety.md#what-a-scan-may-be)."""
    if G is not None:
        from procedures.protection.apply import check_generator_fits
        check_generator_fits(G, cfg.slab, scan.hu, scan_path)
    if centres:
        from procedures.attacker.pipeline import check_cube_fits
        check_cube_fits(scan.shape, scan.spacing, scan_path)


def _check_args(args) -> None:
    if args.batch < 1:
        raise UsageError("--batch must be >= 1")
    if args.seed < 0:
        raise UsageError("--seed must be >= 0")
    if not args.checkpoint and not args.targets and not args.seal:
        raise UsageError("give a checkpoint (-c), --targets CSV, --seal KEYFILE, or several")
    if args.targets and (not args.eps > 0 or args.targeted_steps < 1):
        raise UsageError("--eps must be > 0 and --targeted-steps >= 1")
    if args.seal:
        from procedures.protection.seal import BLOCK_SIZES

        if args.block_size not in BLOCK_SIZES:
            raise UsageError(f"--block-size must be {BLOCK_SIZES.start} to {BLOCK_SIZES.stop - 1}")
        if args.targets and args.eps < 1:
            raise UsageError("--seal changes a voxel by 1 HU: --eps must be >= 1")


def _perturb(args, scan, G, cfg, dtype, device, centres) -> np.ndarray:
    """The protected HU: the generator's (or the scan), then the targets' optimised perturbation."""
    from tqdm import tqdm

    hu = scan.hu
    name = Path(args.scan).name
    out = np.empty(hu.shape, dtype=hu.dtype if np.issubdtype(hu.dtype, np.integer) else np.float32)
    if G is not None:
        from procedures.protection.apply import protect_hu
        protect_hu(G, hu, cfg, device, dtype=dtype, seed=args.seed, batch=args.batch, out=out,
                   progress=None if args.no_progress else tqdm, desc=f"protect {name}")
    else:
        out[...] = hu
    if centres:
        from procedures.protection.targeted import protect_scan_targets
        signs = G is None and args.background == "signs"
        protect_scan_targets(scan, centres, out, models=args.models, eps=args.eps,
                             steps=args.targeted_steps, seed=args.seed,
                             progress=None if args.no_progress else tqdm,
                             background_name=name if signs else None)
    return out


def _seal(args, hu: np.ndarray, out: np.ndarray, cfg, key: bytes) -> np.ndarray:
    """Seal `out`; the total change from `hu` stays within the perturbation's bound."""
    from procedures.protection.seal import seal_volume
    from utils.stored import stored_as

    bounds = [cfg.eps_hu] if cfg is not None and cfg.eps_hu > 0 else []
    bounds += [args.eps] if args.targets else []
    unbounded = cfg is not None and cfg.eps_hu <= 0
    eps = None if unbounded or not bounds else max(bounds)
    if eps is not None and eps < 1:
        raise UsageError(f"--seal changes a voxel by 1 HU; the perturbation's bound {eps:g} HU "
                         f"is below that")
    if not np.issubdtype(out.dtype, np.integer):  # a float scan: the seal is on integer HU
        out = stored_as(out, np.int16)
        hu = np.rint(hu)
    return seal_volume(out, key, block=args.block_size,
                       reference=hu if eps is not None else None, eps=eps)


def _write(scan_path: Path, scan, out: np.ndarray, out_path: Path, fmt: str) -> Path:
    from utils.scan_io import save_dicom_series, save_mhd, save_numpy, save_sitk

    # `out` already has the stored type (the scan's integer type, float32, or the seal's int16).
    result = dataclasses.replace(scan, hu=out, source_path=str(scan_path))
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from utils.atomic import os_error_message
        raise OutputError(os_error_message(out_path.parent, e)) from None
    if fmt == "mhd":
        return save_mhd(result, out_path)
    if fmt == "numpy":
        return save_numpy(result, out_path)
    if fmt == "dicom":
        return save_dicom_series(result, out_path, series_description="MITS-GAN protected")
    return save_sitk(result, out_path)


def _generator(args):
    """(device, G, its config, dtype); the checkpoint is checked before the scan is read."""
    if not args.checkpoint and not args.targets:
        return "cpu", None, None, None
    from procedures.protection.apply import load_generator
    from utils.device import pick_device

    device = pick_device(args.device)
    if not args.checkpoint:
        return device, None, None, None
    return (device, *load_generator(args.checkpoint, device))


@cli_main(build_parser)
def main(args) -> int:
    _check_args(args)
    from utils.atomic import check_output_dir
    from utils.keyfile import read_key
    from utils.metrics import perturbation_stats
    from utils.scan_io import load_scan

    scan_path = Path(args.scan)
    key = read_key(args.seal) if args.seal else None  # cheap checks first, the scan last
    device, G, cfg, dtype = _generator(args)  # torch only when a generator or targets need it
    if args.targets:
        from procedures.protection.targeted import read_target_rows, targets_for_scan
        rows = read_target_rows(args.targets)
    fmt = args.format or _file_format(Path(args.out)) or ("dicom" if scan_path.is_dir() else "mhd")
    out_path = output_path(scan_path, Path(args.out), fmt)
    check_output(scan_path, out_path)
    check_output_dir(out_path.parent)  # a read-only or impossible folder fails before the work

    scan = load_scan(scan_path)
    depth = scan.hu.shape[0]
    centres = targets_for_scan(rows, scan, scan_path.name) if args.targets else []
    check_fits(scan, scan_path, G, cfg, centres)
    t0 = time.perf_counter()
    out = _perturb(args, scan, G, cfg, dtype, device, centres)
    out = _seal(args, scan.hu, out, cfg, key) if key is not None else out
    seconds = time.perf_counter() - t0
    stats = perturbation_stats(out, scan.hu)
    written = _write(scan_path, scan, out, out_path, fmt)
    how = [f"{cfg.generator} generator"] if G is not None else []
    how += [f"{len(centres)} target(s), eps {args.eps:g} HU"] if centres else []
    how += [f"sealed, {args.block_size} x {args.block_size} blocks"] if key is not None else []
    print(f"protected {scan_path} -> {written} ({depth} slices in {seconds:.1f} s on {device}, "
          f"{' + '.join(how)})")
    print(f"perturbation: RMS {stats['rms_hu']:.2f} HU, max {stats['max_hu']:.1f} HU, "
          f"{100 * stats['changed_fraction']:.1f}% of voxels changed")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
