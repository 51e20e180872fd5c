"""The disruption-vs-steps curve of ceiling runs (docs/results.md, "The ceiling of protection
anywhere"), one line per scan; a run started with --init continues its start's line.

    python -m procedures.protection.ceiling_plot runs/ceiling [runs/ceiling_more ...] --out curve.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils.cli import cli_main
from utils.errors import CliParser, InputFileError, run_cli


def read_runs(folders) -> dict[str, list[dict]]:
    """{scan: [curve segments in step order]}: each segment is a run's <scan>.json with 'offset',
    the steps its --init start had already taken."""
    found: dict[str, list[dict]] = {}
    for folder in folders:
        files = sorted(Path(folder).glob("*.json"))
        if not files:
            raise InputFileError(f"{folder}: no ceiling run (<scan>.json) in it")
        for f in files:
            try:
                run = json.loads(f.read_text())
                run["step"], run["heldout_hu"], run["scan"]  # noqa: B018  # the fields we plot
            except (ValueError, KeyError, TypeError):
                raise InputFileError(f"{f}: not a ceiling run's report") from None
            start = Path(run["init"]) / f.name if run.get("init") else None
            offset = 0
            while start is not None and start.is_file():       # the chain of --init starts
                prev = json.loads(start.read_text())
                offset += prev["step"][-1]
                start = Path(prev["init"]) / f.name if prev.get("init") else None
            found.setdefault(run["scan"], []).append({**run, "offset": offset})
    return {k: sorted(v, key=lambda r: r["offset"]) for k, v in found.items()}


def plot(runs: dict[str, list[dict]], png) -> Path:
    import matplotlib  # lazy: only when a figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (scan, segments) in enumerate(sorted(runs.items())):
        colour = f"C{i}"
        for j, r in enumerate(segments):
            steps = [s + r["offset"] for s in r["step"]]
            ax.plot(steps, r["heldout_hu"], "-", color=colour,
                    label=f"{scan}, held-out" if j == 0 else None)
            train = [(s, v) for s, v in zip(steps, r["train_hu"]) if v == v]  # drop NaN
            if train:
                ax.plot(*zip(*train), ":", color=colour, alpha=0.6,
                        label=f"{scan}, training locations" if j == 0 else None)
            if r["offset"]:
                ax.axvline(r["offset"], color=colour, ls="--", lw=0.8, alpha=0.5)
    ax.set_xlabel("step (one fresh in-lung location, inject + remove)")
    ax.set_ylabel("disruption, seen CT-GAN (HU)")
    ax.set_title("ceiling at eps 10 HU: step 0 = random +-eps signs; dashed: a continued run "
                 "(other held-out set)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = Path(png)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return png


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m procedures.protection.ceiling_plot",
                  description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="ceiling run folders (procedures.protection.ceiling --out)")
    p.add_argument("--out", required=True, help="the PNG to write")
    return p


@cli_main(build_parser)
def main(args) -> int:
    print(f"wrote {plot(read_runs(args.runs), args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
