"""Mean and range of the held-out table over several evaluations (docs/results.md, "Figures a
newcomer reproduces").

    python -m procedures.evaluation.aggregate --out runs/demo-seeds \\
        runs/demo/eval/results.json runs/seed1/demo/eval/results.json \
        runs/seed2/demo/eval/results.json

Each results.json is one `evaluate.py` run, here one independent training of the CT-GAN pairs
and of the protection model (`make demo SEED=N`). The runs must share the evaluation's
locations (kind, number per scan, seed, actions), so only the trainings differ. For every
method and attacker: the perturbation RMS and max, the disruption (all, inject, remove), the
disruption over that of random signs in the same run (x signs) and the tampered-square SSIM,
each as mean [min, max] over the runs. Writes aggregate.md and aggregate.json into --out.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Sequence

from utils.atomic import atomic_write_text
from utils.cli import cli_main
from utils.errors import CliParser, InputFileError, OutputError, UsageError, run_cli

# Evaluation settings that must agree: the same tampers in every run.
SAME_SETTINGS = ("locations", "n_locations", "seed", "actions", "window")

# (key, column title, digits) of every figure per attacker, in table order.
ATTACKER_FIGURES = (("disruption", "disruption (HU)", 1), ("inject", "inject", 1),
                    ("remove", "remove", 1), ("x_signs", "x signs", 2), ("ssim", "SSIM", 3))


def _num(v) -> float | None:
    """A number from results.json (non-finite values are stored as strings)."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def load_results(path) -> dict:
    """One evaluate.py results.json; a one-line InputFileError when it is not one."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputFileError(f"{path}: results file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(f"{path}: not a readable results.json ({e})") from None
    if not isinstance(doc, dict) or not all(k in doc for k in ("settings", "methods", "summary")):
        raise InputFileError(f"{path}: not an evaluate.py results.json "
                             "(no settings/methods/summary)")
    return doc


def heldout_figures(doc: dict) -> dict:
    """{method name: {"label", "rms_hu", "max_hu", attacker: {figure: value}}} of one run; x
    signs is the disruption over that of the `signs` method of the same run."""
    summary = doc["summary"]
    labels = {name: label for name, label in doc["methods"]}
    out = {}
    for name, label in labels.items():
        p = summary.get("perturbation", {}).get(label, {})
        fig = {"label": label, "rms_hu": _num(p.get("rms_hu")), "max_hu": _num(p.get("max_hu"))}
        for attacker, per in summary.get("disruption", {}).items():
            d = per.get(label)
            if d is None:
                continue
            base = per.get(labels.get("signs", ""), {})
            dis, ref = _num(d.get("disruption_rmse_hu")), _num(base.get("disruption_rmse_hu"))
            fig[attacker] = {"disruption": dis, "inject": _num(d.get("disruption_inject")),
                             "remove": _num(d.get("disruption_remove")),
                             "x_signs": dis / ref if dis is not None and ref else None,
                             "ssim": _num(d.get("ssim_tampered_vs_unprotected")),
                             "attack_rmse_hu": _num(d.get("attack_rmse_hu"))}
        out[name] = fig
    return out


def spread(values) -> dict:
    """mean, min, max and n of the values that are numbers (None when there is none)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def check_same_evaluation(docs: Sequence[dict], names: Sequence[str]) -> None:
    """UsageError unless every run attacked the same locations."""
    first = docs[0]["settings"]
    for doc, name in zip(docs[1:], names[1:]):
        diff = [k for k in SAME_SETTINGS if doc["settings"].get(k) != first.get(k)]
        if diff:
            raise UsageError(f"{name}: evaluated with other {', '.join(diff)} than {names[0]}; "
                             "only runs of the same evaluation can be aggregated")


def aggregate(docs: Sequence[dict]) -> dict:
    """Mean and range of every figure of the held-out table over the runs, for the methods and
    attackers every run has."""
    figs = [heldout_figures(d) for d in docs]
    methods = [m for m in figs[0] if all(m in f for f in figs)]
    attackers = [a for a in docs[0]["summary"].get("disruption", {})
                 if all(a in d["summary"].get("disruption", {}) for d in docs)]
    out = {"runs": len(docs), "attackers": attackers, "methods": {}}
    for m in methods:
        entry = {"label": figs[0][m]["label"],
                 "rms_hu": spread(f[m]["rms_hu"] for f in figs),
                 "max_hu": spread(f[m]["max_hu"] for f in figs)}
        for a in attackers:
            keys = [k for k, _, _ in ATTACKER_FIGURES] + ["attack_rmse_hu"]
            entry[a] = {k: spread(f[m].get(a, {}).get(k) for f in figs) for k in keys}
        out["methods"][m] = entry
    return out


def _cell(s: dict, digits: int) -> str:
    if s["mean"] is None:
        return "—"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def markdown(agg: dict, sources: Sequence[str]) -> str:
    """The held-out table with every figure as mean [min, max] over the runs."""
    lines = [f"# Held-out table over {agg['runs']} runs: mean [min, max]", "",
             "Runs: " + ", ".join(f"`{s}`" for s in sources), "",
             "x signs = disruption / that of random signs in the same run, then mean [min, max].",
             ""]
    head = ["method", "perturbation RMS (HU)", "max (HU)"]
    for a in agg["attackers"]:
        head += [f"{a}: {title}" for _, title, _ in ATTACKER_FIGURES]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in agg["methods"].values():
        cells = [entry["label"], _cell(entry["rms_hu"], 2), _cell(entry["max_hu"], 0)]
        for a in agg["attackers"]:
            cells += [_cell(entry[a][k], digits) for k, _, digits in ATTACKER_FIGURES]
        lines.append("| " + " | ".join(cells) + " |")
    attack = [f"{a} {_cell(next(iter(agg['methods'].values()))[a]['attack_rmse_hu'], 1)} HU"
              for a in agg["attackers"]] if agg["methods"] else []
    if attack:
        lines += ["", "The attack itself (RMSE(CT-GAN(real), real) in the cube): "
                  + "; ".join(attack) + "."]
    return "\n".join(lines) + "\n"


def build_parser() -> CliParser:
    p = CliParser(prog="python -m procedures.evaluation.aggregate",
                  description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json files of evaluate.py, one per run")
    p.add_argument("--out", default="", help="folder for aggregate.md and aggregate.json "
                                             "(default: print only)")
    return p


@cli_main(build_parser)
def main(args) -> int:
    docs = [load_results(r) for r in args.results]
    check_same_evaluation(docs, args.results)
    agg = aggregate(docs)
    text = markdown(agg, args.results)
    if args.out:
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "aggregate.json",
                              json.dumps({"sources": list(args.results), **agg}, indent=1) + "\n")
            atomic_write_text(out / "aggregate.md", text)
        except OSError as e:
            raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
