"""Evaluate MITS-GAN (and baselines) against CT-GAN tampering: the published tables and more.

    python evaluate.py --checkpoint runs/demo/checkpoint.pt --models models --data data/z2.5

For every scan and N seeded tamper locations in the lungs (or the folder's healthy.csv /
nodules.csv with --locations csv), CT-GAN injects and removes on the real scan and on each
protected version. The real image is compared with: protected (per method), tampered protected
(per method) and tampered unprotected (CT-GAN(real)), on the tamper's centre slice and on the
tampered square: RMSE (HU), PSNR, SSIM, LPIPS, as in the published tables (docs/results.md). Also the perturbation size
per method and the disruption of the attack (RMSE between CT-GAN(protected) and CT-GAN(real) in
the 32 mm cube, and its ratio to the perturbation there).

Every location is drawn from the evaluation's own random stream, which no training uses
(default 12 per scan, inject and remove at each). With --holdout-models, a second CT-GAN pair
that no training has seen (`make ctgan-holdout`) attacks the same locations, and the held-out
table shows both attackers side by side, each method beside the random-signs baseline.

Protection methods (--methods, comma-separated):
  mitsgan   the checkpoint's generator
  noise     Gaussian noise with the RMS (HU) of MITS-GAN's perturbation of the same scan
            (or --noise-rms HU when mitsgan is not evaluated)
  signs     random +-eps HU on every voxel (--eps; default the checkpoint's bound, else 10 HU)
  targeted  targeted protection of the --targets CSV rows (procedures.protection.targeted), optimised
            through the seen attacker's PyTorch port on offsets of even parity; evaluate it
            with --locations targets (held-out offsets of odd parity around each target);
            random +-eps signs elsewhere (the signs column's draw)
  targeted_bare  the same targeted perturbation with nothing elsewhere
  mitsgan2  a second MITS-GAN checkpoint (--checkpoint2), e.g. the white-box `whitebox` model
  mitsgan_float, mitsgan2_float
            the same generators' float32 output, not rounded to the scan's int16 storage
            (every other column is evaluated as stored): what storage does to the protection
  ceiling   the saved per-scan perturbations of `python -m procedures.protection.ceiling`
            (--ceiling-dir): one bounded perturbation per scan optimised at random in-lung
            locations through the seen attacker, the ceiling of protection anywhere
  tafim     the TAFIM baseline (Aneja et al., ECCV 2022; procedures/baselines/tafim.py) from --tafim-checkpoint
            (trained with `python -m procedures.baselines.tafim`)
Adding a method: one entry in METHODS below (a builder returning a ProtectionMethod).

--seal evaluates the seal instead (docs/seal.md): each scan is sealed, tampered by both attackers at
the same held-out locations as tamper.py does, verified, and the tamper map compared with the
blocks that changed; written to seal.md and seal.json in --out.

--curve 5,10,20,40 adds disruption vs eps for signs, targeted and every generator (curve.png).

Outputs in --out: results.md (our table beside the published one, then the held-out table),
results.csv (one row per sample, column and region), results.json, qualitative_<scan>.png.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from utils.cli import cli_main
from utils.errors import CliParser, OutputError, UsageError, run_cli
from utils.metrics import LPIPS_WEIGHTS_HELP
# lazy: procedures.* (torch, SciPy), tqdm and the scan I/O are imported inside the functions
# that use them, so --help and argument errors answer at once without loading torch.



def _window(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in HU, got {text!r}") from None
    if not hi > lo:
        raise argparse.ArgumentTypeError(f"window {text}: HIGH must exceed LOW")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, epilog=LPIPS_WEIGHTS_HELP,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/z2.5", help="folder of scans (default data/z2.5)")
    p.add_argument("--checkpoint", default="runs/demo/checkpoint.pt",
                   help="MITS-GAN checkpoint (default runs/demo/checkpoint.pt)")
    p.add_argument("--models", default="models", help="CT-GAN models folder with INJ/ and REM/")
    p.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    p.add_argument("--holdout-models", default="",
                   help="a second CT-GAN models folder (INJ/, REM/) never used in training: the unseen attacker")
    p.add_argument("--methods", default="mitsgan,noise,signs",
                   help="protection methods (default mitsgan,noise,signs)")
    p.add_argument("--eps", type=float, default=None,
                   help="L-inf bound (HU) of signs and targeted (default: the checkpoint's eps_hu, else 10)")
    p.add_argument("--targets", default="", help="targets CSV (z,y,x[,coord][,filename]) for targeted / --locations targets")
    p.add_argument("--targeted-steps", type=int, default=120, help="Adam steps per target (default 120)")
    p.add_argument("--curve", default="", help="eps values in HU for the disruption-vs-eps curve, e.g. 5,10,20,40")
    p.add_argument("--checkpoint2", default="",
                   help="a second MITS-GAN checkpoint for --methods mitsgan2 (its own columns)")
    p.add_argument("--tafim-checkpoint", default="runs/tafim/checkpoint.pt",
                   help="TAFIM checkpoint for --methods tafim (default runs/tafim/checkpoint.pt)")
    p.add_argument("--ceiling-dir", default="runs/ceiling",
                   help="perturbations of --methods ceiling (default runs/ceiling)")
    p.add_argument("--noise-rms", type=float, default=None,
                   help="noise RMS in HU (default: MITS-GAN's perturbation RMS of each scan)")
    p.add_argument("-n", "--n-locations", type=int, default=12,
                   help="tamper locations per scan, or offsets per target (default 12)")
    p.add_argument("--locations", choices=["lung", "csv", "targets"], default="lung",
                   help="lung: seeded voxels of the lung mask; csv: inject at healthy.csv, remove at "
                        "nodules.csv; targets: held-out offsets (+-2 voxels) around the --targets rows")
    p.add_argument("--actions", default="inject,remove", help="inject,remove (default both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=_window, default=(-1000.0, 400.0),
                   help="HU window for PSNR/SSIM/LPIPS, LOW,HIGH (default -1000,400)")
    p.add_argument("--lpips-weights", default=None, help="LPIPS AlexNet weights (file or folder, see below)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch", type=int, default=4, help="slabs per generator call")
    p.add_argument("--backend", choices=["tensorflow", "torch"], default=None, help="Keras backend for CT-GAN")
    p.add_argument("--max-scans", type=int, default=0, help="evaluate only the first N scans (0 = all)")
    p.add_argument("--seal", action="store_true",
                   help="evaluate the seal (detection, localisation, false alarms) instead "
                        "of protection")
    p.add_argument("--block-size", type=int, default=8,
                   help="--seal: block side in voxels (default 8)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


# --- protection methods: name -> builder(args, context) -> ProtectionMethod ----------------------
# `context` holds what builders share (device, progress) and the methods built so far, by name.
def _build_mitsgan(args, ctx):
    from procedures.evaluation.methods import mitsgan_method

    G, cfg, dtype = _generator(ctx, "mitsgan", args.checkpoint)
    ctx["mitsgan_config"] = cfg
    return mitsgan_method(G, cfg, ctx["device"], dtype, seed=args.seed, batch=args.batch,
                          progress=ctx["progress"], label=f"MITS-GAN ({cfg.preset}, {cfg.generator})")


def _generator(ctx, key: str, checkpoint):
    """Load a checkpoint's generator once, shared by its stored and float columns."""
    from procedures.protection.apply import load_generator

    cache = ctx.setdefault("generators", {})
    if key not in cache:
        cache[key] = load_generator(checkpoint, ctx["device"])
    return cache[key]


def _build_noise(args, ctx):
    from procedures.evaluation.methods import gaussian_noise_method, matched_rms

    if args.noise_rms is not None:
        if args.noise_rms < 0:
            raise UsageError("--noise-rms must be >= 0")
        return gaussian_noise_method(args.noise_rms, seed=args.seed, label=f"noise ({args.noise_rms:g} HU)")
    if "mitsgan" not in ctx["methods"]:
        raise UsageError("--methods noise needs mitsgan listed before it, or --noise-rms HU")
    return gaussian_noise_method(matched_rms(ctx["methods"]["mitsgan"]), seed=args.seed,
                                 label="noise (MITS-GAN's RMS)")


METHODS: dict[str, Callable] = {"mitsgan": _build_mitsgan, "noise": _build_noise}


def _build_tafim(args, ctx):
    from procedures.baselines.tafim import load_tafim
    from procedures.evaluation.methods import tafim_method

    model, cfg, state = load_tafim(args.tafim_checkpoint, ctx["device"])
    return tafim_method(model, ctx["device"], batch=args.batch, progress=ctx["progress"],
                        label=f"TAFIM (width {cfg.width}, slab {cfg.slab}, {state['step']} steps)")


METHODS["tafim"] = _build_tafim


def _build_mitsgan2(args, ctx):
    """A second MITS-GAN checkpoint as its own columns (e.g. the published black-box model
    beside the bounded `whitebox` one)."""
    from procedures.evaluation.methods import mitsgan_method

    if not args.checkpoint2:
        raise UsageError("--methods mitsgan2 needs --checkpoint2 CKPT")
    G, cfg, dtype = _generator(ctx, "mitsgan2", args.checkpoint2)
    return mitsgan_method(G, cfg, ctx["device"], dtype, seed=args.seed, batch=args.batch,
                          progress=ctx["progress"], name="mitsgan2",
                          label=f"MITS-GAN 2 ({cfg.preset}, {cfg.generator}, eps {cfg.eps_hu:g} HU, {cfg.attack_mode})")


METHODS["mitsgan2"] = _build_mitsgan2


def _float_variant(base: str):
    """`<base>_float`: the same generator's float32 output, not rounded to int16 (i.e.
    protection evaluated before and after storage, side by side)."""
    def build(args, ctx):
        from procedures.evaluation.methods import mitsgan_method

        if base not in ctx["methods"]:
            raise UsageError(f"--methods {base}_float needs {base} listed before it")
        stored = ctx["methods"][base]
        G, cfg, dtype = ctx["generators"][base]
        return mitsgan_method(G, cfg, ctx["device"], dtype, seed=args.seed, batch=args.batch,
                              progress=ctx["progress"], name=f"{base}_float", stored=False,
                              label=f"{stored.label}, float (not stored)")
    return build


METHODS["mitsgan_float"] = _float_variant("mitsgan")
METHODS["mitsgan2_float"] = _float_variant("mitsgan2")


def _eps(args, ctx) -> float:
    """The bound of signs and targeted: --eps, else the evaluated checkpoint's, else 10 HU."""
    if args.eps is not None:
        return args.eps
    cfg = ctx.get("mitsgan_config")
    return float(cfg.eps_hu) if cfg is not None and cfg.eps_hu > 0 else 10.0


def _build_signs(args, ctx):
    from procedures.evaluation.methods import random_signs_method

    return random_signs_method(_eps(args, ctx), seed=args.seed)


def _target_settings(args, eps, background="signs"):
    from procedures.protection.targeted import TargetSettings

    # Even-parity offsets only: the evaluation's offsets around a target are the odd ones.
    return TargetSettings(eps=eps, steps=args.targeted_steps, seed=args.seed, parity=0,
                          background=background).validate()


def _targeted_builder(background: str):
    def build(args, ctx):
        from procedures.evaluation.methods import targeted_method
        from procedures.protection.targeted import load_attacker

        if not ctx.get("targets"):
            raise UsageError("--methods targeted needs --targets CSV")
        ctx.setdefault("torch_attacker", load_attacker(args.models))
        s = _target_settings(args, _eps(args, ctx), background)
        return targeted_method(ctx["torch_attacker"], ctx["targets"], s, progress=ctx["progress"],
                               name="targeted" if background == "signs" else "targeted_bare",
                               boxes=ctx.setdefault("target_boxes", {}),
                               label=f"targeted, eps {s.eps:g} HU, {s.steps} steps, {background} elsewhere")
    return build


METHODS["signs"] = _build_signs


def _build_ceiling(args, ctx):
    import json

    from procedures.evaluation.methods import ceiling_method

    folder = Path(args.ceiling_dir)
    reports = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not reports:
        raise UsageError(f"--methods ceiling: no perturbation in {folder} "
                         f"(python -m procedures.protection.ceiling --out {folder})")
    doc = json.loads(reports[0].read_text())
    s, done = doc.get("settings", {}), (doc.get("step") or ["?"])[-1]
    return ceiling_method(folder, eps=_eps(args, ctx),
                          label=f"ceiling, eps {s.get('eps', 0):g} HU, step {done} of {s.get('steps', '?')}")


METHODS["ceiling"] = _build_ceiling
METHODS["targeted"] = _targeted_builder("signs")
METHODS["targeted_bare"] = _targeted_builder("none")


def _curve_methods(args, ctx, eps: float) -> list:
    """The methods of the eps curve at one eps, named alike at every eps."""
    from procedures.evaluation.methods import eps_scaled_method, random_signs_method, targeted_method

    out = [random_signs_method(eps, seed=args.seed, label=f"random +-{eps:g} HU signs")]
    main = ctx["methods"].get("targeted")
    if main is not None:
        same = main.label.startswith(f"targeted, eps {eps:g} HU")
        out.append(main if same else targeted_method(ctx["torch_attacker"], ctx["targets"],
                                                     _target_settings(args, eps), progress=ctx["progress"]))
    for key in ("mitsgan", "mitsgan2"):
        if key in ctx.get("float_bases", {}):
            base, bound, label = ctx["float_bases"][key]
            out.append(eps_scaled_method(base, eps, bound, name=key, label=f"{label} at eps {eps:g}"))
    return out


def _float_bases(args, ctx) -> None:
    """Each evaluated generator's float output, computed once per scan for the curve."""
    from procedures.evaluation.methods import mitsgan_method

    ctx["float_bases"] = {}
    for key in ("mitsgan", "mitsgan2"):
        if key in ctx["methods"]:
            G, cfg, dtype = ctx["generators"][key]
            base = mitsgan_method(G, cfg, ctx["device"], dtype, seed=args.seed, batch=args.batch,
                                  progress=ctx["progress"], name=key, stored=False)
            ctx["float_bases"][key] = (base, float(cfg.eps_hu), f"{key} ({cfg.preset})")


def _parse_curve(text: str) -> list[float]:
    try:
        eps = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--curve: comma-separated eps values in HU, not {text!r}") from None
    if not eps or any(not e > 0 for e in eps):
        raise UsageError(f"--curve: eps values must be > 0, got {text!r}")
    return eps


def _check_args(args) -> tuple[list[str], tuple[str, ...], list[float]]:
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UsageError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    actions = tuple(a.strip() for a in args.actions.split(",") if a.strip())
    if not actions or any(a not in ("inject", "remove") for a in actions):
        raise UsageError(f"--actions must list inject and/or remove, got {args.actions!r}")
    if args.n_locations < 1:
        raise UsageError("--n-locations must be >= 1")
    if args.batch < 1 or args.seed < 0:
        raise UsageError("--batch must be >= 1 and --seed >= 0")
    if args.eps is not None and not args.eps > 0:
        raise UsageError("--eps must be > 0")
    if args.locations == "targets" and not args.targets:
        raise UsageError("--locations targets needs --targets CSV")
    return names, actions, _parse_curve(args.curve) if args.curve else []


def _attackers(args, actions) -> dict:
    """The seen attacker (--models) and, with --holdout-models, the unseen one; loaded now, so a
    missing model fails before hours of work."""
    from procedures.attacker.pipeline import ScanManipulator

    out = {"seen": ScanManipulator(args.models, backend=args.backend)}
    if args.holdout_models:
        out["unseen"] = ScanManipulator(args.holdout_models, backend=args.backend)
    for manip in out.values():
        for a in actions:
            manip.model(a)
    return out


def _run_info(args, ctx, names, device) -> dict:
    """What the report's header says about the run."""
    info = {"data": args.data, "checkpoint": args.checkpoint if "mitsgan" in names else "-",
            "CT-GAN models": f"seen: {args.models}" + (f"; unseen (never trained on): {args.holdout_models}"
                                                       if args.holdout_models else ""),
            "device": str(device)}
    if "mitsgan_config" in ctx:
        c = ctx["mitsgan_config"]
        info["MITS-GAN"] = (f"preset {c.preset}, generator {c.generator} (width {c.g_width}), slab {c.slab}, "
                            f"eps {c.eps_hu:g} HU" + (" (unbounded)" if not c.eps_hu else ""))
    return info


def _seal_main(args, actions) -> int:
    """evaluate.py --seal: the seal against both attackers (procedures.evaluation.seal_eval)."""
    import json

    from tqdm import tqdm

    from procedures.evaluation.seal_eval import seal_evaluation, seal_markdown
    from procedures.protection.seal import check_block
    from scanDataset import ScanDataset
    from utils.atomic import atomic_write_text, check_output_dir

    check_block(args.block_size)
    out = Path(args.out)
    check_output_dir(out)
    data = ScanDataset(args.data, cache=False)
    attackers = _attackers(args, actions)
    n_scans = len(data) if not args.max_scans else min(args.max_scans, len(data))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "seal_rows.jsonl"  # each row as measured; seal.json at the end
    log.unlink(missing_ok=True)
    res = seal_evaluation((data[i] for i in range(n_scans)), attackers,
                          n_locations=args.n_locations, seed=args.seed, actions=actions,
                          mode=args.locations, block=args.block_size,
                          progress=None if args.no_progress else tqdm, log=log)
    text = seal_markdown(res)
    atomic_write_text(out / "seal.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(out / "seal.md", text)
    print(text)
    print(f"wrote {out / 'seal.md'} and {out / 'seal.json'}")
    return 0


@cli_main(build_parser)
def main(args) -> int:
    names, actions, curve_eps = _check_args(args)
    if args.seal:
        return _seal_main(args, actions)

    from tqdm import tqdm

    from procedures.evaluation.run import EvalSettings, evaluate, tradeoff_curve
    from procedures.evaluation.reports import curve_report, write_reports
    from procedures.protection.targeted import read_target_rows
    from scanDataset import ScanDataset
    from utils.device import pick_device
    from utils.atomic import check_output_dir, os_error_message, removed_on_failure
    from utils.metrics import load_lpips

    out = Path(args.out)
    check_output_dir(out)  # an impossible output folder fails now, not after hours of work
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = pick_device(args.device)
    progress = None if args.no_progress else tqdm
    # Everything that can fail cheaply is checked before any scan is protected.
    ctx = {"device": device, "progress": progress, "methods": {},
           "targets": read_target_rows(args.targets) if args.targets else None}
    for n in names:
        ctx["methods"][n] = METHODS[n](args, ctx)
    lpips_model = load_lpips(args.lpips_weights, device) if args.lpips_weights else None
    data = ScanDataset(args.data, cache=False)  # one scan in memory at a time
    attackers = _attackers(args, actions)
    n_scans = len(data) if not args.max_scans else min(args.max_scans, len(data))
    settings = EvalSettings(n_locations=args.n_locations, locations=args.locations, actions=actions,
                            seed=args.seed, window=args.window, figure=not args.no_figures,
                            targets=ctx["targets"])
    info = _run_info(args, ctx, names, device)

    def scans():
        items = (data[i] for i in range(n_scans))
        return items if progress is None else progress(items, total=n_scans, desc="scans", unit="scan")

    try:
        with removed_on_failure(out, "qualitative_*.png", "curve.png"):  # a failed run leaves no figure
            res = evaluate(scans(), list(ctx["methods"].values()), attackers, settings, out,
                           lpips_model=lpips_model, progress=progress, info=info)
            extra = []
            if curve_eps:
                _float_bases(args, ctx)
                curve = tradeoff_curve(scans(), lambda e: _curve_methods(args, ctx, e), attackers,
                                       settings, curve_eps, progress=progress)
                res.info["curve"] = curve
                extra = curve_report(curve, out / "curve.png")
                res.figures.append(str(out / "curve.png"))
            paths = write_reports(res, out, extra_sections=extra)
    except OSError as e:  # a folder that cannot be made (full disk, read-only); files are atomic
        raise OutputError(os_error_message(getattr(e, "filename", None) or out, e)) from None
    print(paths["md"].read_text())
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['json']} and {len(res.figures)} figure(s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
