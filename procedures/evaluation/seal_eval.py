"""The seal against CT-GAN (docs/seal.md#measured): seal each scan, tamper it as tamper.py does
(load the scan, tamper at a held-out location, round to the stored int16, write and read back
a MetaImage), verify, and compare the tamper map with the truth, the blocks in which a stored
voxel changed. Also verifies each untampered sealed scan after the same write and read (false
alarms)."""
from __future__ import annotations

import dataclasses
import secrets
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from procedures.evaluation.locations import CUBE_MM, cube_region, sample_locations
from procedures.protection.seal import Grid, changed_blocks, seal_volume, verify_volume
from scanDataset import VolumeItem
from utils.errors import MitsError, WrongKeyError
from utils.scan_io import load_scan, save_mhd
from utils.stored import stored_as


def _round_trip(scan, hu: np.ndarray, tmp: Path, name: str) -> np.ndarray:
    path = tmp / f"{name}.mhd"
    save_mhd(dataclasses.replace(scan, hu=hu, source_path=None, dicom_headers=None), path)
    out = load_scan(path).hu
    path.unlink()
    path.with_suffix(".raw").unlink()
    return out


def _extent_mm(mask: np.ndarray, spacing) -> list[float]:
    """Side lengths (mm, z y x) of the box around the True voxels of a (z, y, x) mask."""
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return [0.0, 0.0, 0.0]
    return [float((hi - lo + 1) * s) for lo, hi, s in zip(idx.min(0), idx.max(0), spacing)]


def tamper_row(manip, scan, sealed: np.ndarray, loc, key: bytes, block: int, tmp: Path) -> dict:
    """One tamper: as tamper.py on the sealed scan, then verify.py's verdict against the truth."""
    manip.set_scan(dataclasses.replace(scan, hu=sealed))
    manip.tamper(np.asarray(loc.vox, np.float64), action=loc.action, isVox=True)
    tampered = _round_trip(scan, stored_as(manip.scan.hu, np.int16), tmp, "tampered")
    t0 = time.perf_counter()
    try:
        v = verify_volume(tampered, key, workers=1)  # one process: the attacker holds the CPUs
        failed = v.failed
    except WrongKeyError:  # every block changed: flagged everywhere
        failed = np.ones_like(changed_blocks(sealed, tampered, block))
    seconds = time.perf_counter() - t0
    truth = changed_blocks(sealed, tampered, block)
    tp = int((failed & truth).sum())
    diff = tampered.astype(np.int32) - sealed
    cube = np.zeros(sealed.shape, bool)
    cube[cube_region(scan.spacing, loc.vox, sealed.shape)] = True
    outside = (diff != 0) & ~cube
    reach = np.zeros(sealed.shape, bool)  # everything the attacker may touch (its reference cube)
    reach[manip.footprint(sealed.shape, scan.spacing, loc.vox)] = True
    by, bx = Grid(block, *sealed.shape[1:]).block_of_voxel(np.arange(sealed.shape[1]),
                                                           np.arange(sealed.shape[2]))
    flagged_vox = failed[:, by[:, None], bx[None, :]]
    return {"z": loc.z, "y": loc.y, "x": loc.x, "action": loc.action,
            "detected": bool(failed.any()), "changed_blocks": int(truth.sum()),
            "flagged_blocks": int(failed.sum()), "recall": tp / max(int(truth.sum()), 1),
            "precision": tp / max(int(failed.sum()), 1),
            "exact": bool(np.array_equal(failed, truth)),
            "centre_flagged": bool(failed[loc.z, by[loc.y], bx[loc.x]]),
            "changed_voxels": int((diff != 0).sum()), "changed_outside_cube": int(outside.sum()),
            "max_change_outside_cube_hu": int(np.abs(diff[outside]).max()) if outside.any() else 0,
            "changed_outside_footprint": int(((diff != 0) & ~reach).sum()),
            "changed_extent_mm": _extent_mm(diff != 0, scan.spacing),
            "flagged_extent_mm": _extent_mm(flagged_vox, scan.spacing), "verify_seconds": seconds}


def seal_evaluation(items: Iterable[VolumeItem], attackers: dict, *, n_locations: int, seed: int,
                    actions, mode: str = "lung", block: int = 8, progress=None,
                    log: Path | None = None) -> dict:
    """Rows per (scan, attacker, location, action) and the untampered scans' false alarms.
    `log`: a JSON-lines file that gets every row as soon as it is measured (a long run that is
    stopped keeps what it measured)."""
    import json

    def record(kind: str, row: dict) -> None:
        if log is not None:
            with open(log, "a") as f:
                f.write(json.dumps({"kind": kind, **row}) + "\n")

    key = secrets.token_bytes(32)  # the evaluation's own key; never stored
    rows, clean = [], []
    with tempfile.TemporaryDirectory(prefix="seal_eval_") as tmpdir:
        tmp = Path(tmpdir)
        for item in items:
            name = Path(item.path).name
            t0 = time.perf_counter()
            sealed = seal_volume(item.scan.hu, key, block=block)
            sealed = _round_trip(item.scan, sealed, tmp, "sealed")
            seal_s = time.perf_counter() - t0
            v = verify_volume(sealed, key)
            change = int(np.abs(sealed.astype(np.int32) - item.scan.hu).max())
            clean.append({"scan": name, "shape": list(sealed.shape),
                          "false_blocks": int(v.failed.sum()), "intact": v.intact,
                          "max_change_hu": change, "seal_seconds": seal_s})
            record("clean", clean[-1])
            locs = sample_locations(item, n_locations, seed=seed, mode=mode, actions=actions)
            # each location by every attacker in turn: a stopped run keeps both columns
            jobs = [(a, m, loc) for loc in locs for a, m in attackers.items()]
            it = jobs if progress is None else progress(jobs, desc=f"seal {name}", leave=False)
            for attacker, manip, loc in it:
                try:
                    r = tamper_row(manip, item.scan, sealed, loc, key, block, tmp)
                except MitsError as e:
                    r = {"z": loc.z, "y": loc.y, "x": loc.x, "action": loc.action, "error": str(e)}
                rows.append({"scan": name, "attacker": attacker, **r})
                record("tamper", rows[-1])
    return {"block": block, "cube_mm": CUBE_MM, "clean": clean, "rows": rows}


def seal_summary(res: dict) -> dict:
    """Per attacker: detection rate, recall/precision, exact maps, centres flagged, extents."""
    out = {}
    for attacker in dict.fromkeys(r["attacker"] for r in res["rows"]):
        rs = [r for r in res["rows"] if r["attacker"] == attacker and "error" not in r]
        if not rs:
            continue
        ext = np.array([r["flagged_extent_mm"] for r in rs])
        out[attacker] = {
            "tampers": len(rs),
            "errors": sum(1 for r in res["rows"] if r["attacker"] == attacker) - len(rs),
            "detected": sum(r["detected"] for r in rs), "exact": sum(r["exact"] for r in rs),
            "centre_flagged": sum(r["centre_flagged"] for r in rs),
            "recall_min": min(r["recall"] for r in rs),
            "precision_min": min(r["precision"] for r in rs),
            "flagged_extent_mm_mean": ext.mean(0).round(1).tolist(),
            "flagged_extent_mm_max": ext.max(0).round(1).tolist(),
            "changed_outside_cube": [min(r["changed_outside_cube"] for r in rs),
                                     max(r["changed_outside_cube"] for r in rs)],
            "max_change_outside_cube_hu": max(r["max_change_outside_cube_hu"] for r in rs),
            "changed_outside_footprint": max(r["changed_outside_footprint"] for r in rs)}
    return out


def seal_markdown(res: dict) -> str:
    """The seal section of the evaluation report."""
    s = seal_summary(res)
    b = res["block"]
    lines = [f"## Seal: detection and localisation ({b} x {b} blocks)", "",
             "Truth: the blocks in which a stored voxel changed. Extent: side of the box around "
             f"the flagged voxels (z, y, x mm), beside CT-GAN's {res['cube_mm']:g} mm cube. Reach: "
             "the attacker's reference cube (ScanManipulator.footprint); a voxel changed "
             "outside it "
             "would be the writers' doing, not the tamper's.", "",
             "| attacker | tampers | flagged | map = truth | block recall (min) "
             "| block precision (min) "
             "| centre flagged | flagged extent mean (max), mm | changed voxels outside the cube "
             "| max change there (HU) | changed outside the attacker's reach |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a, r in s.items():
        mean, mx = (" x ".join(f"{v:g}" for v in r[k])
                    for k in ("flagged_extent_mm_mean", "flagged_extent_mm_max"))
        lo, hi = r["changed_outside_cube"]
        n = r["tampers"]
        lines.append(f"| {a} | {n} | {r['detected']}/{n} | {r['exact']}/{n} "
                     f"| {100 * r['recall_min']:.1f}% | {100 * r['precision_min']:.1f}% "
                     f"| {r['centre_flagged']}/{r['tampers']} | {mean} ({mx}) | {lo:,}-{hi:,} "
                     f"| {r['max_change_outside_cube_hu']} | {r['changed_outside_footprint']} |")
    lines += ["", "| untampered sealed scan | shape | false blocks | max seal change (HU) "
              "| seal time (s) |",
              "|---|---|---|---|---|"]
    lines += [f"| {c['scan']} | {' x '.join(map(str, c['shape']))} | {c['false_blocks']} "
              f"| {c['max_change_hu']} "
              f"| {c['seal_seconds']:.1f} |" for c in res["clean"]]
    errs = [r for r in res["rows"] if "error" in r]
    if errs:
        lines += ["", f"{len(errs)} tamper(s) failed (not counted): {errs[0]['error']}"]
    return "\n".join(lines) + "\n"
