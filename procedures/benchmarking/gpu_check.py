"""One command for a GPU machine (`make gpu-check`): benchmark, train, evaluate, protect, tamper.

    python -m procedures.benchmarking.gpu_check                          # CUDA, data/z2.5, models/
    python -m procedures.benchmarking.gpu_check --device cpu --quick     # the same steps, tiny, on the CPU
    python -m procedures.benchmarking.gpu_check --export-npy runs/gpu_data   # scans as .npy + .json to carry

Each step is a separate process with a time limit, timed; the first failure stops the check
with its output's tail and a non-zero exit. Every step runs Keras on its torch backend
(KERAS_BACKEND=torch) and the black-box attacker in torch, so a machine with PyTorch and no
TensorFlow runs it all. Scans may be .npy + .json (utils.scan_io.save_numpy; no SimpleITK).
Steps: bench.py (train: paper, paper with the Keras attacker, whitebox, whitebox with bf16 +
channels_last, and the reference; protect; tamper), a short `train.py --preset whitebox` on the
scans, evaluate.py and protect.py with that checkpoint, tamper.py with the torch attacker.
The figures go to docs/performance.md (bench.md in --out holds the tables).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from utils.cli import cli_main
from utils.errors import CliParser, InputFileError, MitsError, run_cli

ROOT = Path(__file__).resolve().parents[2]


class Step(NamedTuple):
    name: str
    argv: list[str]
    timeout_s: int


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m procedures.benchmarking.gpu_check", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) | cuda:N | cpu (a dry run)")
    p.add_argument("--data", default="data/z2.5", help="folder of scans (.mhd or .npy + .json)")
    p.add_argument("--models", default="models", help="CT-GAN models folder with INJ/ and REM/")
    p.add_argument("--out", default="runs/gpu_check", help="outputs of every step")
    p.add_argument("--train-steps", type=int, default=300, help="steps of the short training (default 300)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and step counts (a CPU dry run)")
    p.add_argument("--export-npy", metavar="DIR", default=None,
                   help="only write the --data scans as .npy + .json (and the CSVs) into DIR")
    return p


def first_scan(data: Path) -> Path:
    from scanDataset import SCAN_SUFFIXES  # lazy: scanDataset pulls torch (keeps --help light)

    if not data.is_dir():
        raise InputFileError(f"{data}: scan folder not found")
    scans = sorted(p for p in data.iterdir() if p.name.lower().endswith(SCAN_SUFFIXES))
    if not scans:
        raise InputFileError(f"{data}: no scans (.mhd or .npy)")
    return scans[0]


def plan(args, scan_shape) -> list[Step]:
    """The steps, in order; --quick shrinks sizes and counts, not what runs."""
    py, dev, out, data, models = sys.executable, args.device, Path(args.out), args.data, args.models
    q = args.quick
    fast = "amp=bf16:channels_last=true" if dev.startswith("cuda") else "channels_last=true"
    tiny = ":g_width=4:d_width=4" if q else ""
    bench = [py, "bench.py", "--device", dev, "--keras_backend", "torch", "--out", str(out / "bench"),
             "--train", f"paper{tiny},paper{tiny}:attacker_impl=keras,whitebox{tiny},whitebox{tiny}:{fast}",
             "--reference", f"reference{tiny}",
             "--protect", f"whitebox:batch=16{tiny},whitebox:batch=16:{fast}{tiny},paper:batch=8{tiny}"]
    bench += (["--size", "64", "--depth", "72", "--protect_slices", "8", "--steps", "1", "--warmup", "0",
               "--tamper_reps", "1", "--models_dir", models] if q else ["--models_dir", models])
    ckpt = out / "train" / "checkpoint.pt"
    train = [py, "train.py", "--preset", "whitebox", "--data_dir", data, "--models_dir", models,
             "--device", dev, "--out_dir", str(out / "train"), "--keras_backend", "torch",
             "--max_steps", str(2 if q else args.train_steps), "--progress", "false", "--sample_every", "0"]
    train += ["--g_width", "4", "--d_width", "4"] if q else []
    evaluate = [py, "evaluate.py", "--data", data, "--checkpoint", str(ckpt), "--models", models,
                "--out", str(out / "eval"), "--device", dev, "--backend", "torch", "--no-progress",
                "-n", "1" if q else "4"] + (["--no-figures", "--max-scans", "1"] if q else [])
    scan = first_scan(Path(data))
    protect = [py, "protect.py", str(scan), "-c", str(ckpt), "-o", str(out / "protect") + "/",
               "--device", dev, "--no-progress"]
    z, h, w = scan_shape
    tamper = [py, "tamper.py", "-t", str(scan), "-d", str(out / "tamper"), "-a", "inject",
              "-c", f"{z // 2},{h // 2},{int(0.3 * w)}", "--models", models, "--impl", "torch",
              "--device", dev, "--backend", "torch", "-f", "numpy"]
    limit = 1800 if q else 600
    return [Step("bench", bench, limit), Step("train", train, limit), Step("evaluate", evaluate, limit),
            Step("protect", protect, 300 if not q else limit), Step("tamper", tamper, 300 if not q else limit)]


def run_step(step: Step, log_dir: Path) -> float:
    """Run one step (KERAS_BACKEND=torch), its output in <log_dir>/<name>.log; seconds taken.
    A failure or a time-out raises StepFailed with the output's tail."""
    env = {**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = log_dir / f"{step.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(step.argv) + "\n")
        f.flush()
        try:
            rc = subprocess.run(step.argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=step.timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {step.timeout_s} s"
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise StepFailed(f"gpu-check step {step.name!r} FAILED ({rc if isinstance(rc, str) else f'exit {rc}'}, "
                         f"{seconds:.0f} s; log {log}):\n{tail}")
    return seconds


class StepFailed(MitsError):
    """A gpu-check step failed or ran out of time (the message holds its output's tail)."""

    exit_code = 1


def export_npy(data: Path, dest: Path) -> None:
    """The scans of `data` as .npy + .json (and its CSVs) in `dest`: what a machine without
    SimpleITK reads, and what fits the carry to a GPU machine."""
    from scanDataset import SCAN_SUFFIXES  # lazy: keeps this orchestrator free of torch and numpy (fast --help)
    from utils.scan_io import load_scan, save_numpy

    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(data.iterdir()):
        if p.name.lower().endswith(SCAN_SUFFIXES) and not p.name.lower().endswith(".npy"):
            print(f"wrote {save_numpy(load_scan(p), dest / (p.name.split('.')[0] + '.npy'))}")
        elif p.suffix == ".csv":
            shutil.copy2(p, dest / p.name)


@cli_main(build_parser)
def main(args) -> int:
    if args.export_npy:
        export_npy(Path(args.data), Path(args.export_npy))
        return 0
    from utils.device import pick_device  # lazy: keeps this orchestrator free of torch and numpy (fast --help)
    from utils.scan_io import load_scan

    pick_device(args.device)  # a machine without CUDA fails here, in one line
    scan = load_scan(first_scan(Path(args.data)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    for step in plan(args, scan.hu.shape):
        print(f"gpu-check: {step.name} ...", flush=True)
        print(f"gpu-check: {step.name} ok in {run_step(step, out):.1f} s", flush=True)
    print(f"gpu-check: all steps passed in {time.perf_counter() - total:.0f} s on {args.device}; "
          f"tables in {out / 'bench' / 'bench.md'}, logs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
