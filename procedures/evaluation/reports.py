"""Aggregation and reports of an evaluation: the published tables' layout, the held-out
disruption table, results.md / .csv / .json, the disruption-vs-eps curve and the qualitative
figure (docs/results.md)."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from utils import metrics as M
from utils.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from procedures.evaluation.run import EvalResult


REGIONS = ("slice", "square")


METRICS = ("rmse", "psnr", "psnr_image_range", "ssim", "lpips")


LPIPS_NA = "n/a (weights unavailable)"


# The published tables (MITS-GAN paper and README): real image vs each column.
PUBLISHED_COLUMNS = ("protected MITS-GAN", "protected TAFIM", "tampered MITS-GAN", "tampered TAFIM")


PUBLISHED = {
    "slice": {"rmse": (169.481, 194.943, 198.253, 233.780), "psnr": (27.949, 21.702, 21.237, 21.469),
              "lpips": (0.170, 0.383, 0.226, 0.391), "ssim": (0.983, 0.945, 0.970, 0.981)},
    "square": {"rmse": (50.565, 66.061, 84.349, 79.451), "psnr": (26.682, 18.854, 11.289, 18.511),
               "lpips": (0.372, 0.3417, 0.591, 0.346), "ssim": (0.992, 0.972, 0.740, 0.866)},
}


def _column_keys(names: Sequence[str]) -> list[tuple[str, str]]:
    """(kind, method name) of every compared column, in table order; 'none' = unprotected."""
    return [("protected", n) for n in names] + [("tampered", n) for n in names] + [("tampered", "none")]


def column_label(kind: str, name: str, labels: dict) -> str:
    if name == "none":
        return "tampered, unprotected (CT-GAN(real))"
    return f"{kind} {labels[name]}"


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    if any(math.isinf(v) for v in vals):
        return float("inf") if all(v > 0 for v in vals if math.isinf(v)) else float("nan")
    return float(np.mean(vals))


def pooled_psnr(vals) -> float | None:
    """PSNR of the mean peak-normalised MSE over samples: -10 log10(mean(10^(-PSNR_i / 10))).
    A mean of per-sample PSNRs is inf as soon as one sample is identical (a perturbation that
    rounds to 0 in a small square); this one is finite unless every sample is identical, and it
    is what one PSNR over all samples' pixels (each at its own peak) gives."""
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    mse = float(np.mean([10.0 ** (-v / 10.0) for v in vals]))  # 10^(-inf) = 0: identical samples
    return float("inf") if mse == 0 else float(-10.0 * math.log10(mse))


DIS_KEYS = ("disruption_rmse_hu", "perturbation_rms_cube_hu", "amplification", "attack_rmse_hu",
            "ssim_tampered_vs_unprotected")


def summarise(res: EvalResult) -> dict:
    """Means over samples: table[region][column_label][metric]; disruption[attacker][label] and
    perturbation[label] per method."""
    labels = dict(res.methods)
    keys = _column_keys([n for n, _ in res.methods])
    table = {}
    for region in REGIONS:
        table[region] = {}
        for kind, key in keys:
            rows = [r for r in res.rows if r["region"] == region and r["kind"] == kind and r["method"] == key]
            if not rows:
                continue
            table[region][column_label(kind, key, labels)] = {
                "n": len(rows), **{m: (pooled_psnr if m.startswith("psnr") else _mean)([r[m] for r in rows])
                                   for m in METRICS}}
    disruption = {}
    for attacker in res.info.get("attackers", ["seen"]):
        disruption[attacker] = {}
        for name, label in res.methods:
            rows = [r for r in res.disruption if r["method"] == name and r.get("attacker", "seen") == attacker]
            if not rows:
                continue
            d = disruption[attacker][label] = {"n": len(rows), **{k: _mean([r[k] for r in rows]) for k in DIS_KEYS}}
            for action in sorted({r["action"] for r in rows}):
                sub = [r for r in rows if r["action"] == action]
                d[f"amplification_{action}"] = _mean([r["amplification"] for r in sub])
                d[f"disruption_{action}"] = _mean([r["disruption_rmse_hu"] for r in sub])
    perturbation = {}
    for name, label in res.methods:
        rows = [r for r in res.perturbation if r["method"] == name]
        perturbation[label] = {"rms_hu": _mean([r["rms_hu"] for r in rows]),
                               "max_hu": max((r["max_hu"] for r in rows), default=None),
                               "per_scan": {r["scan"]: {"rms_hu": r["rms_hu"], "max_hu": r["max_hu"]}
                                            for r in rows}}
    return {"table": table, "disruption": disruption, "perturbation": perturbation}


def _fmt(v, digits=3) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if math.isnan(v):
        return "nan"
    return f"{v:.{digits}f}"


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (float, np.floating)):
        o = float(o)
        return o if math.isfinite(o) else ("inf" if o == math.inf else "-inf" if o == -math.inf else "nan")
    if isinstance(o, np.integer):
        return int(o)
    return o


def _header(res: EvalResult) -> list[str]:
    """The run's settings and how each metric is scaled."""
    s = res.settings
    lo, hi = s["window"]
    rng_ = hi - lo
    scans = sorted({r["scan"] for r in res.rows})
    n_samples = len({(r["scan"], r["loc"], r["action"]) for r in res.rows})
    lines = ["# MITS-GAN evaluation", ""]
    for k, v in res.info.items():
        if k not in ("protect_seconds", "curve", "attackers"):
            lines.append(f"- {k}: {v}")
    lines += [
        f"- scans: {', '.join(scans)}; {n_samples} tamper samples ({s['locations']} locations, "
        f"{s['n_locations']} per scan, actions {', '.join(s['actions'])}, seed {s['seed']})",
        f"- failed tampers: {len(res.failures)}", "",
        "Every column compares the **real** image with the column's image, on the tamper's centre "
        "slice (whole slice) or on the tampered square (the in-plane footprint of the 32 mm cube "
        "on that slice). Means over samples; PSNR from the mean peak-normalised MSE over samples "
        "(finite when a sample is identical).", "",
        "Intensity scale and data range:",
        "- RMSE: raw HU, no clipping (HU).",
        f"- PSNR [window]: HU clipped to [{lo:g}, {hi:g}] HU (lung window), data range {rng_:g} HU "
        "(skimage.metrics.peak_signal_noise_ratio).",
        "- PSNR [image range]: raw HU, peak = max - min of the real image itself (per-image range; "
        "the published PSNR implies a different peak per column).",
        f"- SSIM: HU clipped to [{lo:g}, {hi:g}], data range {rng_:g} HU (skimage structural_similarity, "
        "7x7 uniform window).",
        ("- LPIPS: AlexNet v0.1 (user's weights), HU clipped to the window and mapped to [-1, 1], "
         f"grey repeated to 3 channels; images under {M.LPIPS_MIN_SIDE} px upsampled (bilinear)."
         if res.lpips else f"- LPIPS: {LPIPS_NA}; pass --lpips-weights (see `evaluate.py --help`)."),
        "- Published columns: the paper's numbers; its scale, data range, LPIPS backbone, "
        "scans and locations are not stated. Its single PSNR row is shown on our image-range row.",
        ""]
    return lines


def _image_tables(res: EvalResult, summary: dict) -> list[str]:
    """Real vs each column on the whole slice and on the tampered square, beside the paper's."""
    lo, hi = res.settings["window"]
    rng_ = hi - lo
    lines = []
    metric_rows = [("rmse", "RMSE (HU)"),
                   ("psnr", f"PSNR dB [window {lo:g}..{hi:g} HU, range {rng_:g}]"),
                   ("psnr_image_range", "PSNR dB [image range]"),
                   ("ssim", f"SSIM [window {lo:g}..{hi:g} HU, range {rng_:g}]"),
                   ("lpips", "LPIPS (AlexNet)")]
    published_row = {"rmse": "rmse", "psnr_image_range": "psnr", "ssim": "ssim", "lpips": "lpips"}
    for region, title in (("slice", "Whole slice"), ("square", "Tampered square only")):
        cols = summary["table"].get(region, {})
        head = list(cols) + [f"published: {c}" for c in PUBLISHED_COLUMNS]
        lines += [f"## {title} (real vs each column)", "",
                  "| metric | " + " | ".join(head) + " |",
                  "|---|" + "---|" * len(head)]
        for key, name in metric_rows:
            ours = [(_fmt(c[key]) if not (key == "lpips" and not res.lpips) else LPIPS_NA)
                    for c in cols.values()]
            pub = PUBLISHED[region].get(published_row.get(key, ""), (None,) * 4)
            lines.append(f"| {name} | " + " | ".join(ours + [_fmt(v) for v in pub]) + " |")
        lines.append("")
    return lines


def _attack_tables(summary: dict) -> list[str]:
    """The perturbation each method adds, and how much it disrupts each attacker."""
    lines = []
    lines += ["## Perturbation size (protected - real, whole scan, as stored)", "",
              "| method | RMS (HU), mean over scans | max (HU) | per scan RMS / max |", "|---|---|---|---|"]
    for label, p in summary["perturbation"].items():
        per = "; ".join(f"{k}: {_fmt(v['rms_hu'], 1)} / {_fmt(v['max_hu'], 0)}" for k, v in p["per_scan"].items())
        lines.append(f"| {label} | {_fmt(p['rms_hu'], 2)} | {_fmt(p['max_hu'], 1)} | {per} |")
    lines += ["", "## Disruption of the attack (in the 32 mm cube around each location)", "",
              "RMSE(CT-GAN(protected), CT-GAN(real)) in HU; perturbation RMS = RMSE(protected, real) "
              "in the same cube; amplification = their ratio (1: the attack passes the perturbation "
              "through unchanged; higher: the protection disrupts the attack). Attack RMSE = "
              "RMSE(CT-GAN(real), real) in the cube, for scale.", "",
              "| attacker | method | disruption RMSE (HU) | perturbation RMS in cube (HU) | amplification | "
              "amplification inject | amplification remove | attack RMSE (HU) | n |",
              "|---|---|---|---|---|---|---|---|---|"]
    for attacker, per in summary["disruption"].items():
        for label, d in per.items():
            lines.append(f"| {attacker} | {label} | {_fmt(d['disruption_rmse_hu'], 1)} "
                         f"| {_fmt(d['perturbation_rms_cube_hu'], 1)} | {_fmt(d['amplification'], 2)} "
                         f"| {_fmt(d.get('amplification_inject'), 2)} | {_fmt(d.get('amplification_remove'), 2)} "
                         f"| {_fmt(d['attack_rmse_hu'], 1)} | {d['n']} |")
    return lines


def markdown_report(res: EvalResult, summary: dict, extra_sections: Sequence[str] = ()) -> str:
    lines = _header(res) + _image_tables(res, summary) + _attack_tables(summary)
    if res.figures:
        lines += ["", "## Figures", ""] + [f"- {Path(f).name}" for f in res.figures]
    if res.failures:
        lines += ["", "## Failed tampers", ""] + [
            f"- {f['scan']} {f['location']['action']} at {(f['location']['z'], f['location']['y'], f['location']['x'])}: "
            f"{'; '.join(f'{k}: {v}' for k, v in f['errors'].items())}" for f in res.failures]
    return "\n".join(lines + [""] + list(extra_sections) + heldout_table(res, summary)) + "\n"


def heldout_table(res: EvalResult, summary: dict) -> list[str]:
    """The protection table: every attacker side by side, each method's disruption beside the
    random-signs baseline's, and how visible the protection is in the tampered result."""
    s = res.settings
    per = summary["disruption"]
    attackers = list(per)
    signs = next((label for name, label in res.methods if name == "signs"), None)
    pert = summary["perturbation"]
    lines = [f"## Held-out protection ({', '.join(attackers)} attacker{'s' if len(attackers) > 1 else ''})", "",
             f"Locations: {s['locations']}, {s['n_locations']} per scan (or per target), actions "
             f"{', '.join(s['actions'])}, drawn from the evaluation's own random stream (seed {s['seed']}), "
             "which no training uses. Disruption = RMSE(CT-GAN(protected), CT-GAN(real)) in the 32 mm "
             "cube (HU; inject / remove in brackets); x signs = disruption / that of random +-eps signs; "
             "SSIM = SSIM(tampered protected, tampered unprotected) on the tampered square "
             "(1: the protection leaves no visible trace in the tampered result).", ""]
    head = ["method", "perturbation RMS / max (HU, whole scan)"]
    for a in attackers:
        head += [f"{a}: disruption (HU)", f"{a}: x signs", f"{a}: SSIM"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, label in res.methods:
        p = pert.get(label, {})
        cells = [label, f"{_fmt(p.get('rms_hu'), 2)} / {_fmt(p.get('max_hu'), 0)}"]
        for a in attackers:
            d = per[a].get(label)
            base = per[a].get(signs) if signs else None
            if d is None:
                cells += ["—"] * 3
                continue
            ratio = (d["disruption_rmse_hu"] / base["disruption_rmse_hu"]
                     if base and base["disruption_rmse_hu"] else None)
            cells += [f"{_fmt(d['disruption_rmse_hu'], 1)} ({_fmt(d.get('disruption_inject'), 1)} / "
                      f"{_fmt(d.get('disruption_remove'), 1)})", _fmt(ratio, 2),
                      _fmt(d["ssim_tampered_vs_unprotected"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


CSV_FIELDS = ("scan", "loc", "z", "y", "x", "action", "source", "kind", "method", "region", *METRICS,
              "disruption_rmse_hu", "perturbation_rms_cube_hu", "amplification", "attack_rmse_hu",
              "ssim_tampered_vs_unprotected")


def csv_report(res: EvalResult) -> str:
    dis = {(d["scan"], d["loc"], d["method"]): d for d in res.disruption if d.get("attacker", "seen") == "seen"}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in res.rows:
        row = dict(r)
        if r["kind"] == "tampered" and r["region"] == "square":
            row.update({k: v for k, v in dis.get((r["scan"], r["loc"], r["method"]), {}).items()
                        if k in CSV_FIELDS[-5:]})
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def write_reports(res: EvalResult, out_dir, extra_sections: Sequence[str] = ()) -> dict[str, Path]:
    """results.md, results.csv, results.json in out_dir (each written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(res)
    paths = {"md": out / "results.md", "csv": out / "results.csv", "json": out / "results.json"}
    atomic_write_text(paths["md"], markdown_report(res, summary, extra_sections))
    atomic_write_text(paths["csv"], csv_report(res))
    doc = {"settings": res.settings, "info": res.info, "methods": res.methods,
           "scale": {"rmse": "HU, raw",
                     "psnr": {"window_hu": res.settings["window"],
                              "data_range_hu": res.settings["window"][1] - res.settings["window"][0]},
                     "psnr_image_range": "raw HU, peak = max - min of the real image",
                     "ssim": {"window_hu": res.settings["window"],
                              "data_range_hu": res.settings["window"][1] - res.settings["window"][0]},
                     "lpips": "AlexNet v0.1, window -> [-1, 1]" if res.lpips else LPIPS_NA},
           "summary": summary, "published": {"columns": PUBLISHED_COLUMNS, **PUBLISHED},
           "samples": res.rows, "disruption": res.disruption, "perturbation": res.perturbation,
           "failures": res.failures, "figures": res.figures}
    atomic_write_text(paths["json"], json.dumps(_jsonable(doc), indent=1) + "\n")
    return paths


def save_png(fig, path, dpi: int) -> None:
    """Write a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt  # lazy: matplotlib only when a figure is drawn

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def curve_report(curve: dict, path) -> list[str]:
    """Plot the curve (one panel per attacker) into `path` and return its markdown lines."""
    import matplotlib  # lazy: matplotlib only when a figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curve), figsize=(5.2 * len(curve), 4.0), squeeze=False)
    lines = ["## Disruption vs eps", "",
             "Mean disruption (HU) at the same held-out locations, both actions; generators at "
             "another eps: a bounded one's perturbation scaled by eps / its bound, an unbounded "
             "one's clipped to +-eps (before int16 storage). SSIM(tampered protected, tampered "
             "unprotected) on the tampered square in brackets.", ""]
    for ax, (attacker, per) in zip(axes[0], curve.items()):
        eps = sorted({e for m in per.values() for e in m["eps"]})
        lines += [f"| {attacker} attacker | " + " | ".join(f"eps {e:g} HU" for e in eps) + " |",
                  "|---|" + "---|" * len(eps)]
        for name, m in per.items():
            ax.plot(m["eps"], m["disruption"], marker="o", label=name)
            by = dict(zip(m["eps"], zip(m["disruption"], m["ssim"])))
            lines.append(f"| {name} | " + " | ".join(
                f"{_fmt(by[e][0], 1)} ({_fmt(by[e][1], 3)})" if e in by else "—" for e in eps) + " |")
        lines.append("")
        ax.set_xscale("log", base=2)
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.set_xlabel("L-inf bound eps (HU)")
        ax.set_ylabel("disruption RMSE in the 32 mm cube (HU)")
        ax.set_title(f"{attacker} attacker")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_png(fig, path, dpi=100)
    return lines + [f"Figure: {Path(path).name}", ""]


def qualitative_figure(path, real, protected: dict, sample, labels: dict, window) -> None:
    """One row per method: real | protected | tampered real | tampered protected |
    |protected - real| | |tampered protected - tampered real|, on the tamper's centre slice,
    the tampered square outlined."""
    import matplotlib  # lazy: matplotlib only when a figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    loc, tampered, sq = sample
    z = loc.z
    names = [n for n in protected if n in tampered] or list(protected)
    cols = ["real", "protected", "tampered real (CT-GAN)", "tampered protected",
            "|protected − real|", "|tampered protected − tampered real|"]
    fig, axes = plt.subplots(len(names), len(cols), figsize=(2.7 * len(cols), 2.9 * len(names)),
                             squeeze=False)
    t_real = tampered.get("none")
    for r, n in enumerate(names):
        p = protected[n][z]
        t_p = tampered.get(n)
        imgs = [real[z], p, t_real, t_p, np.abs(p - real[z]),
                np.abs(t_p - t_real) if t_p is not None and t_real is not None else None]
        for c, img in enumerate(imgs):
            ax = axes[r, c]
            ax.set_xticks([]); ax.set_yticks([])
            if img is None:
                ax.text(0.5, 0.5, "n/a (tamper failed)", ha="center", va="center", transform=ax.transAxes)
            elif c < 4:
                ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1])
            else:
                vmax = max(float(np.percentile(img, 99.9)), 1.0)
                im = ax.imshow(img, cmap="hot", vmin=0, vmax=vmax)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label("HU", fontsize=7)
            if img is not None:
                ax.add_patch(Rectangle((sq[2].start - 0.5, sq[1].start - 0.5), sq[2].stop - sq[2].start,
                                       sq[1].stop - sq[1].start, fill=False, ec="red", lw=0.8))
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
        axes[r, 0].set_ylabel(labels.get(n, n), fontsize=9)
    fig.suptitle(f"{loc.scan}: {loc.action} at (z,y,x)=({loc.z},{loc.y},{loc.x}); "
                 f"window [{window[0]:g}, {window[1]:g}] HU", fontsize=9)
    save_png(fig, path, dpi=90)
