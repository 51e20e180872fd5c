"""Verify the seal of a CT scan and map where it was tampered (docs/seal.md).

    python verify.py --make-key seal.key
    python protect.py data/z2.5/lung1.mhd --seal seal.key -o sealed/
    python verify.py sealed/lung1_protected.mhd --key seal.key -o report/

Reads a MetaImage (.mhd), NRRD/NIfTI file, .npy or a DICOM series folder; prints the verdict and,
for each tampered region, its slices, voxel box and world box (mm). With -o, writes
<name>_tampermap.mhd (1 where a block failed, the scan's geometry) and <name>_tampermap.png (the
most affected slices with the map in red). Exit codes: 0 intact, 10 tampered (or cropped),
11 no seal, 12 sealed with another key, 13 another block size, 14 unsafe or bad key file;
2-7 as every entry point (docs/safety.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.cli import cli_main
from utils.errors import TAMPERED_EXIT, CliParser, UsageError, run_cli
# lazy: procedures.protection.seal* (NumPy work, SciPy, matplotlib) and the scan readers are
# imported inside main, so --help and argument errors answer at once.


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scan", nargs="?",
                   help="sealed scan: .mhd/.mha/.nrrd/.nii(.gz)/.npy or DICOM folder")
    p.add_argument("--key", default="", help="the seal key file (made by --make-key)")
    p.add_argument("--make-key", metavar="KEYFILE", default="",
                   help="write a new key (32 random bytes, mode 0600) to KEYFILE and stop; "
                        "never overwrites a file")
    p.add_argument("-o", "--out", default="", help="folder for the tamper map and its PNG")
    p.add_argument("--block-size", type=int, default=None,
                   help="expect this block size (default: the one the seal carries)")
    return p


def _make_key(path: str) -> int:
    from utils.keyfile import make_key

    written = make_key(path)
    print(f"wrote a new seal key to {written} (mode 0600): keep it private and backed up; "
          f"whoever holds it can seal a forgery")
    return 0


@cli_main(build_parser)
def main(args) -> int:
    if args.make_key:
        if args.scan or args.key or args.out:
            raise UsageError("--make-key takes only the key file to write")
        return _make_key(args.make_key)
    if not args.scan or not args.key:
        raise UsageError("give a scan and --key KEYFILE (or --make-key KEYFILE)")
    from procedures.protection.seal import check_block, verify_volume
    from procedures.protection.seal_report import summary_lines, tamper_regions, write_outputs
    from utils.atomic import check_output_dir
    from utils.keyfile import read_key
    from utils.scan_io import load_scan, refuse_overwrite
    from utils.scan_paths import scan_stem

    if args.block_size is not None:
        check_block(args.block_size)
    key = read_key(args.key)  # cheap checks first: the key, the output folder, then the scan
    scan_path = Path(args.scan)
    outdir = Path(args.out) if args.out else None
    stem = scan_stem(scan_path)
    if outdir is not None:
        check_output_dir(outdir)
        for name in (f"{stem}_tampermap.mhd", f"{stem}_tampermap.png"):
            refuse_overwrite(outdir / name, scan_path)
    scan = load_scan(scan_path)
    v = verify_volume(scan.hu, key, block=args.block_size)
    regions = tamper_regions(v, scan)
    lines = summary_lines(v, regions)
    print(f"{scan_path}: {lines[0]}")
    for line in lines[1:]:
        print(f"  {line}")
    if outdir is not None:
        title = "intact" if v.intact else f"tampered ({len(regions)} regions)"
        for p in write_outputs(outdir, stem, scan, v, f"{scan_path.name}: {title}"):
            print(f"wrote {p}")
    return 0 if v.intact else TAMPERED_EXIT


if __name__ == "__main__":
    sys.exit(run_cli(main))
