"""Tamper a CT scan with CT-GAN (inject or remove nodules): the attacker of docs/attack.md.

    python tamper.py -t data/z2.5/lung1.mhd -d out -a inject -c 66,359,218 [-c z,y,x ...]

Writes the tampered scan into OUTDIR as <name>_tampered.mhd / .npy / a DICOM folder (never over
the input, atomically) and prints the time of each tamper.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

from utils.atomic import check_output_dir, os_error_message
from utils.cli import cli_main
from utils.errors import CliParser, CoordinateError, OutputError, UsageError, run_cli
from utils.scan_io import load_scan, refuse_overwrite, save_dicom_series, save_mhd, save_numpy
from utils.scan_paths import scan_stem
from utils.stored import int_limits, stored_as

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_COORD = re.compile(rf"^\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*$")


class _Parser(CliParser):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        # World coordinates are often negative: "-c -100,20,-40" is a value, not an option.
        self._negative_number_matcher = re.compile(r"^-[\d.]")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="CT-GAN evidence tampering: inject or remove lung nodules in a CT scan "
                            "(MetaImage .mhd, NRRD, NIfTI, .npy or a DICOM series folder).")
    p.add_argument(
        "-t", "--target", required=True, help="scan to tamper: a .mhd file or a DICOM series folder"
    )
    p.add_argument(
        "-d", "--destination", required=True, help="folder for the tampered scan (created)"
    )
    p.add_argument("-a", "--action", choices=["inject", "remove"], required=True)
    p.add_argument("-c", "--coord", required=True, action="extend", nargs="+", metavar="Z,Y,X",
                   help="location(s) to tamper, z,y,x without spaces; repeat -c or list several")
    p.add_argument("-s", "--system", choices=["vox", "world"], default="vox",
                   help="coordinates are voxel indices (default) or world mm (z,y,x)")
    p.add_argument("-f", "--outformat", choices=["dicom", "mhd", "numpy"], default=None,
                   help="output format (default: dicom for a DICOM input, else mhd)")
    p.add_argument(
        "--models",
        default="models",
        help="folder with INJ/ and REM/ model folders (default: models)",
    )
    p.add_argument("--backend", choices=["tensorflow", "torch"], default=None, help="Keras backend")
    p.add_argument("--seed", type=int, default=None, help="seed for the gaussian noise mode")
    p.add_argument(
        "--noise",
        choices=["copy", "gaussian"],
        default="copy",
        help="noise touch-up: copied from the scan (published default) or smoothed Gaussian",
    )
    p.add_argument(
        "--published-resample",
        action="store_true",
        help="CT-GAN's own zoom (fails on 5 mm slices) instead of exact resampling to 32^3",
    )
    p.add_argument(
        "--impl",
        choices=["auto", "keras", "torch"],
        default="auto",
        help="keras, or torch (procedures.attacker.torch_attacker: equal within 2 HU, copy noise only, "
        "no TensorFlow); auto: torch on a GPU with copy noise",
    )
    p.add_argument(
        "--device", default="auto", help="auto | cpu | cuda | cuda:N (the torch attacker)"
    )
    return p


def _manipulator(args):
    """The attacker: Keras (procedures.attacker.pipeline) or its torch equal on the device."""
    from procedures.attacker.pipeline import ScanManipulator  # lazy: SciPy/torch after --help
    from utils.device import pick_device

    device = pick_device(args.device)
    impl = args.impl
    if impl == "auto":
        impl = "torch" if device.type == "cuda" and args.noise == "copy" else "keras"
    if impl == "keras":
        return ScanManipulator(args.models, backend=args.backend, noise=args.noise, seed=args.seed,
                               exact_resample=not args.published_resample)
    if args.noise != "copy":
        raise UsageError("--impl torch has only the copy-noise touch-up; use --impl keras")
    from procedures.attacker.torch_attacker import TorchScanManipulator
    return TorchScanManipulator(args.models, device=device, seed=args.seed,
                                exact_resample=not args.published_resample)


def parse_coord(text: str) -> np.ndarray:
    m = _COORD.match(text)
    if not m:
        raise CoordinateError(
            f"bad coordinate {text!r}: expected three numbers z,y,x (e.g. 33,359,218)"
        )
    return np.array([float(g) for g in m.groups()])


def output_path(scan_path: Path, dest: Path, fmt: str) -> Path:
    """<dest>/<name>_tampered.mhd / .npy, or the DICOM folder <name>_tampered; <name> is the
    scan's name without its format suffix (a DICOM folder's name as it is)."""
    stem = scan_path.name if scan_path.is_dir() else scan_stem(scan_path)
    return dest / (f"{stem}_tampered" + {"dicom": "", "mhd": ".mhd", "numpy": ".npy"}[fmt])


def _output_hu(tampered: np.ndarray, original_dtype) -> np.ndarray:
    """Integer scans stay integer on disk (CT HU are int16 on disk): round and clip."""
    return stored_as(tampered, original_dtype if int_limits(original_dtype) else np.float32)


@cli_main(build_parser)
def main(args) -> int:
    coords = [parse_coord(c) for c in args.coord]

    # lazy: SciPy and torch only after --help
    from procedures.attacker.pipeline import (AttackShapeError, check_cube_fits,
                                              published_shape_error)
    from utils.scan import check_coord

    scan_path = Path(args.target)
    scan = load_scan(args.target)
    is_dicom = scan_path.is_dir()
    fmt = args.outformat or ("dicom" if is_dicom else "mhd")
    dest = Path(args.destination)
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"cannot write {dest}: exists and is not a folder")
    check_output_dir(dest)  # before any model is loaded or any tamper is done
    out = output_path(scan_path, dest, fmt)
    refuse_overwrite(out, scan_path)  # not over any file the input reads, not inside its folder

    # All coordinates are checked before any model is loaded or anything is written.
    vox = [c if args.system == "vox" else scan.world2vox(c) for c in coords]
    for v in vox:
        check_coord(v, scan.shape)
    check_cube_fits(scan.shape, scan.spacing, scan_path)
    if args.published_resample and published_shape_error(scan.spacing):
        raise AttackShapeError(f"{scan_path}: {published_shape_error(scan.spacing)}")

    man = _manipulator(args)
    man.set_scan(scan)
    t0 = time.perf_counter()
    man.model(args.action)
    print(
        f"loaded the {args.action} model from {man.model_dir} in {time.perf_counter() - t0:.2f} s"
    )
    for i, v in enumerate(vox, 1):
        t0 = time.perf_counter()
        man.tamper(v, action=args.action, isVox=True)
        shown = ",".join(f"{x:g}" for x in v)
        print(
            f"{args.action} {i}/{len(vox)} at voxel (z,y,x)=({shown}): {time.perf_counter() - t0:.3f} s"
        )

    man.scan.hu = _output_hu(man.scan.hu, scan.hu.dtype)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(os_error_message(dest, e)) from None
    if fmt == "mhd":
        written = save_mhd(man.scan, out)
    elif fmt == "numpy":
        written = save_numpy(man.scan, out)
    else:
        written = save_dicom_series(man.scan, out, series_description=f"CT-GAN {args.action}")
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
