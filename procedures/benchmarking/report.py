"""bench.py's markdown tables (docs/performance.md)."""
from __future__ import annotations


def _mem(m: dict) -> str:
    if not m:
        return ""
    if "cuda_peak_mb" in m:
        return f"{m['cuda_peak_mb']:.0f} MB GPU"
    extra = f"; CPU {m['cpu_s']:.0f} s, load {m['load_avg_1min']}" if "cpu_s" in m else ""
    return f"{m['rss_growth_mb']:.0f} MB (RSS {m['rss_peak_mb']:.0f}){extra}"


_MEM_COLUMN = "peak memory (CPU: growth, RSS; CPU time, load)"


def _md_table(title: str, columns: list[str], rows: list[dict], name_key: str, row) -> list[str]:
    """One section: a title, the header, and row(r) per result (an error row when r failed)."""
    lines = [f"#### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append(f"| {r[name_key]} | error: {r['error']} |" + " |" * (len(columns) - 2)
                     if "error" in r else row(r))
    return lines + [""]


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"### MITS-GAN benchmark: {env['device_name']}",
             "", f"`{res['command']}`", "",
             f"torch {env['torch']}, {env['cpu_count']} CPU cores ({env['torch_threads']} torch threads), "
             f"data: {res['data']}; CT-GAN models: {res['ctgan_models']}; 1-minute load average "
             f"at the start {env.get('load_avg_1min')}.", ""]
    if res.get("peak_tflops"):
        lines += ["Measured matmul peak: " + ", ".join(f"{k} {v:.1f} TFLOP/s" if v >= 1 else f"{k} {1e3 * v:.0f} GFLOP/s"
                                                      for k, v in res["peak_tflops"].items()), ""]
    if res.get("train"):
        ref = next((r for r in res["train"] if r.get("is_reference") and "error" not in r), None)

        def train_row(r):
            up = f"{ref['step_s'] / r['step_s']:.1f}x" if ref else ""
            return (f"| {r['spec']}{' (reference)' if r.get('is_reference') else ''} | {r['gd_s']:.3f} | "
                    f"{r['attack_s']:.3f} | {r['step_s']:.3f} | {r['steps_per_s']:.2f} | "
                    f"{r['slices_per_s']:.1f} | {r['attacker']['computed']}/{r['attacker']['of']} | {up} | "
                    f"{_mem(r['memory'])} |")
        lines += _md_table("Training (seconds per step, one step = batch x slab slices)",
                           ["spec", "G/D s", "attacker s", "step s", "steps/s", "slices/s", "term computed",
                            "speed-up vs reference", _MEM_COLUMN], res["train"], "spec", train_row)
    if res.get("protect"):
        def protect_row(r):
            frac = f"{100 * r['peak_fraction']:.1f}% {r['peak_kind']}" if r.get("peak_fraction") else ""
            return (f"| {r['spec']} | {'x'.join(map(str, r['shape'][::-1]))} | {r['wall_s']:.2f} | "
                    f"{r['slices_per_s']:.1f} | {r['wall_300_s']:.1f} | {r['gflop_per_slice']:.1f} | "
                    f"{1e3 * r['achieved_tflops']:.0f} | {frac} | {_mem(r['memory'])} |")
        lines += _md_table("Protection (whole scan through procedures.protection.apply.protect_hu)",
                           ["spec", "scan", "wall s", "slices/s", "512x512x300 s", "GFLOP/slice", "GFLOP/s",
                            "of peak", _MEM_COLUMN], res["protect"], "spec", protect_row)
    if res.get("tamper"):
        def tamper_row(r):
            note = (f"generator alone {r['generator_ms']:.1f} ms" if "generator_ms" in r else
                    f"forward+backward: inject {r['inject_fwd_bwd_ms']:.1f}, remove {r['remove_fwd_bwd_ms']:.1f} ms")
            return f"| {r['attacker']} | {r['inject_ms']:.1f} | {r['remove_ms']:.1f} | {note} | {_mem(r['memory'])} |"
        lines += _md_table("CT-GAN tamper latency per location (median)",
                           ["attacker", "inject ms", "remove ms", "notes", "peak memory"], res["tamper"],
                           "attacker", tamper_row)
    return "\n".join(lines)
