"""bench.py --sections seal: seal and verify of a (slices, size, size) int16 phantom, each in a
fresh process (no torch loaded), wall time and peak RSS (the process's own and its MAC workers';
docs/seal.md#measured).

    python -m procedures.benchmarking.seal_bench --slices 300 --size 512
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[2]


def _peak_mb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # kB on Linux


def _step(op: str, path: Path, workers: int | None) -> dict:
    """One measurement in this process (numpy and the seal only, no torch): 'seal' reads the
    scan from `path` and writes the sealed one to sealed.npy beside it; 'verify' reads that."""
    from procedures.protection.seal import seal_volume, verify_volume

    key = bytes(range(32))
    if op == "seal":
        hu = np.load(path)
        t0, c0 = time.perf_counter(), time.process_time()
        out = seal_volume(hu, key, workers=workers)
    else:
        out = np.load(path.with_name("sealed.npy"))
        t0, c0 = time.perf_counter(), time.process_time()
        v = verify_volume(out, key, workers=workers)
        assert v.intact
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    if op == "seal":
        np.save(path.with_name("sealed.npy"), out)
    return {"op": op, "seconds": round(seconds, 2), "cpu_seconds_main": round(cpu, 2),
            "cpu_seconds_workers": round(child.ru_utime + child.ru_stime, 2),
            "rss_peak_mb": round(_peak_mb(resource.RUSAGE_SELF), 1),
            "worker_rss_peak_mb": round(_peak_mb(resource.RUSAGE_CHILDREN), 1)}


def run(slices: int = 300, size: int = 512, workers: int | None = None) -> list[dict]:
    """Seal, then verify, each in its own process; the rows of the benchmark table."""
    from procedures.benchmarking.benchmark import phantom  # the one synthetic chest (pulls torch)

    rows = []
    with tempfile.TemporaryDirectory(prefix="seal_bench_") as tmp:
        path = Path(tmp) / "scan.npy"
        np.save(path, phantom((slices, size, size), seed=0))
        for op in ("seal", "verify"):
            cmd = [sys.executable, "-m", "procedures.benchmarking.seal_bench", "--step", op,
                   "--path", str(path)]
            if workers is not None:
                cmd += ["--workers", str(workers)]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT)
            if res.returncode != 0:
                last = (res.stderr.strip().splitlines() or ["failed"])[-1]
                rows.append({"op": op, "error": last})
                break
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for r in rows:
        r.update(shape=[slices, size, size], blocks=slices * (size // 8) ** 2,
                 load_avg_1min=None if load is None else round(load, 1), cpus=cpus)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["## Seal and verify (procedures.benchmarking.seal_bench)", "",
             "| step | scan | blocks | wall s | CPU s: main + MAC workers | peak RSS MB "
             "| workers' ru_maxrss MB (with the parent's pages before exec) | load (1 min) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | error: {r['error']} | | | | | | |")
            continue
        shape = " x ".join(map(str, r["shape"]))
        lines.append(f"| {r['op']} | {shape} int16 | {r['blocks']:,} | {r['seconds']} "
                     f"| {r['cpu_seconds_main']} + {r['cpu_seconds_workers']} | {r['rss_peak_mb']} "
                     f"| {r['worker_rss_peak_mb']} "
                     f"| {r['load_avg_1min']} on {r['cpus']} CPUs |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--workers", type=int, default=None,
                   help="MAC processes (default: up to 4 CPUs)")
    p.add_argument("--step", choices=["seal", "verify"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        print(json.dumps(_step(args.step, Path(args.path), args.workers)))
        return 0
    print(markdown(run(args.slices, args.size, args.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
