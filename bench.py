"""Benchmark MITS-GAN: training steps, protection, CT-GAN tampering; speed and memory.

    python bench.py                                   # auto device, synthetic 512x512 phantom
    python bench.py --data real                       # data/z2.5 scans (make data)
    python bench.py --device cuda --keras_backend torch
    python bench.py --sections protect --protect "demo,demo:channels_last=true"

Sections (procedures.benchmarking.benchmark measures them; docs/performance.md has the figures):
  train    seconds per training step split into G/D and attacker (train.train_step), for each
           `--train` spec and for the `--reference` spec (the published code's behaviour:
           float64, whole-scan re-read per eligible step) on the same slabs, and the speed-up
           reference / ours. The slabs are sub-batches the published near-end rule admits, so
           every configuration runs its attacker.
  protect  procedures.protection.apply.protect_hu on a (--protect_slices, size, size) int16 scan: wall
           time, slices/s, FLOPs of one protected slice and the fraction of the device's peak
           (a large matmul measured in the same run).
  tamper   CT-GAN latency per location: Keras (procedures.attacker.pipeline.ScanManipulator), its
           PyTorch equal (procedures.attacker.torch_attacker.TorchScanManipulator, tamper.py's default) and
           the differentiable port (forward and forward+backward).
  seal     protect.py --seal and verify.py's work on a (--protect_slices, size, size) int16 scan,
           each in a fresh process: wall time and peak RSS (procedures.benchmarking.seal_bench;
           docs/seal.md#measured). Not in the default sections.

A spec is `preset[:field=value...]` with config.py fields (train) or protect options
batch (slabs per call), amp (off|bf16|fp16), channels_last, compile and generator fields
(protect), and slices (protect only the first N slices of the scan; the 512x512x300 column
is then extrapolated). CT-GAN models: --models_dir if it holds INJ/ and REM/, else untrained
ones of width --ctgan_gf (published 100) built once under --out. Results: <out>/bench.json and
bench.md. Networks are randomly initialised: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import sys

from utils.errors import CliParser, UsageError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["synthetic", "real"], default="synthetic")
    p.add_argument("--data_dir", default="data/z2.5", help="real scans (--data real)")
    p.add_argument("--size", type=int, default=512, help="synthetic slice size (default 512)")
    p.add_argument(
        "--depth", type=int, default=120, help="synthetic training volume slices (default 120)"
    )
    p.add_argument(
        "--protect_slices", type=int, default=300, help="slices of the protected scan (default 300)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--sections", default="train,protect,tamper")
    p.add_argument("--train", default=None, help="training specs (default depends on the device)")
    p.add_argument("--reference", default="reference", help="the reference spec ('' = none)")
    p.add_argument(
        "--protect", default=None, help="protection specs (default depends on the device)"
    )
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps / calls (default 1)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per spec (default 3)")
    p.add_argument(
        "--tamper_reps", type=int, default=5, help="timed tampers per action (default 5)"
    )
    p.add_argument(
        "--models_dir", default="models", help="trained CT-GAN models ('' = always untrained)"
    )
    p.add_argument(
        "--ctgan_gf", type=int, default=16, help="width of untrained CT-GAN models (published 100)"
    )
    p.add_argument("--keras_backend", default="", choices=["", "tensorflow", "torch"])
    p.add_argument("--out", default="runs/bench")
    return p


def _seal_section(args) -> None:
    """Seal and verify figures, printed and written to <out>/seal_bench.json and .md."""
    import json
    from pathlib import Path

    from procedures.benchmarking.seal_bench import markdown, run
    from utils.atomic import atomic_write_text

    rows = run(args.protect_slices, args.size)
    text = markdown(rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "seal_bench.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(out / "seal_bench.md", text)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - {"train", "protect", "tamper", "seal"})
    if unknown:
        raise UsageError(f"--sections: unknown {unknown}")
    for name in ("warmup", "steps", "tamper_reps", "size", "depth", "protect_slices", "ctgan_gf"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise UsageError(f"--{name} must be positive")
    if "seal" in sections:
        _seal_section(args)
        sections.remove("seal")
        if not sections:
            return 0
    from procedures.benchmarking.benchmark import run_sections  # lazy: torch after --help
    from procedures.benchmarking.report import markdown

    command = "python bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res = run_sections(args, set(sections), command)
    print(markdown(res))
    failed = [r["spec"] if "spec" in r else r["attacker"] for sec in ("train", "protect", "tamper")
              for r in res.get(sec, []) if "error" in r]
    if failed:
        print(f"warning: {len(failed)} measurement(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
