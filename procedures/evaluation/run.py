"""The evaluation run: protect every scan with every method, tamper the real and the protected
scans at held-out locations with each attacker, and collect the image metrics and the
disruption of the attack (docs/results.md).

For every scan: each protection method gives a protected scan (rounded to int16 like a stored
scan when the source is int16). At N seeded locations inside the lungs (or from the folder's
CSVs), CT-GAN injects and removes, on the real scan and on each protected one. The real image is
then compared with every column, as published:
    protected <method>                real vs protected
    tampered <method>                 real vs CT-GAN(protected)
    tampered, unprotected             real vs CT-GAN(real)   (the "no protection" baseline)
on two regions of the tamper's centre slice: the whole slice and the tampered square (the
in-plane footprint of the 32 mm cube). Disruption: in the 32 mm cube, RMSE between
CT-GAN(protected) and CT-GAN(real), and its ratio to the perturbation RMS in the same cube
("amplification": 1 would mean the attack passes the perturbation through unchanged).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from procedures.evaluation.locations import cube_region, sample_locations
from procedures.evaluation.methods import ProtectionMethod, as_stored
from procedures.evaluation.reports import REGIONS, _column_keys, _mean, qualitative_figure
from scanDataset import VolumeItem
from utils import metrics as M
from utils.errors import MitsError, ModelFileError, UsageError


log = logging.getLogger("mitsgan.evaluation")


@dataclass
class EvalSettings:
    n_locations: int = 12
    locations: str = "lung"                       # lung | csv | targets
    actions: tuple = ("inject", "remove")
    seed: int = 0
    window: tuple = M.LUNG_WINDOW
    figure: bool = True
    targets: list | None = None                   # targets CSV rows (procedures.protection.targeted) or None
    image_metrics: bool = True                    # False: disruption rows only (the eps curve)


@dataclass
class EvalResult:
    settings: dict
    methods: list                                  # [(name, label)]
    rows: list = field(default_factory=list)       # per sample x column x region
    perturbation: list = field(default_factory=list)  # per scan x method
    disruption: list = field(default_factory=list)    # per sample x method
    failures: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    lpips: bool = False
    info: dict = field(default_factory=dict)


def _pair_metrics(real, test, window, lpips_model) -> dict:
    out = {"rmse": M.rmse(real, test), "psnr": M.psnr(real, test, window),
           "psnr_image_range": M.psnr_image_range(real, test), "ssim": M.ssim(real, test, window),
           "lpips": M.lpips_hu(lpips_model, real, test, window) if lpips_model is not None else None}
    return out


def evaluate(items: Iterable[VolumeItem], methods: Sequence[ProtectionMethod], manipulator,
             settings: EvalSettings, out_dir=None, *, lpips_model=None, progress=None,
             info: dict | None = None) -> EvalResult:
    """Run the evaluation; write figures into out_dir (when given and settings.figure).

    `manipulator`: a procedures.attacker.pipeline.ScanManipulator (its tamper_volume is used on
    float32 copies), or {attacker name: ScanManipulator} with the seen attacker ("seen") first:
    the image tables use the first, the disruption rows every one. `progress`: tqdm-like or None."""
    names = [m.name for m in methods]
    if len(set(names)) != len(names) or "none" in names:
        raise UsageError(f"protection method names must be unique and not 'none': {names}")
    attackers = dict(manipulator) if isinstance(manipulator, dict) else {"seen": manipulator}
    labels = {m.name: m.label for m in methods}
    res = EvalResult(settings=_settings_dict(settings), methods=[(m.name, m.label) for m in methods],
                     lpips=lpips_model is not None, info=dict(info or {}))
    res.info.setdefault("attackers", list(attackers))
    for item in items:
        name = Path(item.path).name
        real = item.scan.hu.astype(np.float32)
        protected = _protect_all(item, methods, res)
        locs = sample_locations(item, settings.n_locations, seed=settings.seed, mode=settings.locations,
                                actions=settings.actions, targets=settings.targets)
        work = np.empty_like(real)
        it = locs if progress is None else progress(locs, desc=f"tamper {name}", leave=False, unit="tamper")
        fig_sample = None
        for li, loc in enumerate(it):
            cube = cube_region(item.scan.spacing, loc.vox, real.shape)
            sample = {"scan": name, "loc": li, "z": loc.z, "y": loc.y, "x": loc.x,
                      "action": loc.action, "source": loc.source}
            for ai, (attacker, manip) in enumerate(attackers.items()):
                tampered = _tamper_columns(manip, item, loc, li, real, protected, methods, work, cube,
                                           settings.seed, res, attacker)
                if tampered is None:
                    continue
                if ai == 0 and settings.image_metrics:
                    _image_rows(res, sample, real, protected, tampered, names, cube, window_of(settings),
                                lpips_model)
                _disruption_rows(res, {**sample, "attacker": attacker}, real, protected, tampered,
                                 methods, cube, window_of(settings))
                if ai == 0 and fig_sample is None:
                    fig_sample = (loc, {k: v["slice"] for k, v in tampered.items()}, cube)
        if out_dir is not None and settings.figure and fig_sample is not None:
            path = Path(out_dir) / f"qualitative_{Path(name).stem}.png"
            qualitative_figure(path, real, protected, fig_sample, labels, window_of(settings))
            res.figures.append(str(path))
    if not res.disruption and not res.rows:
        raise MitsError("no sample could be evaluated: every tamper failed "
                        + (f"({res.failures[0]['errors']})" if res.failures else "(no locations)"))
    return res


def window_of(settings: EvalSettings) -> tuple[float, float]:
    return tuple(float(v) for v in settings.window)


def _protect_all(item: VolumeItem, methods, res: EvalResult) -> dict:
    """Every method's protected scan (as stored unless the method says float) and its size."""
    name = Path(item.path).name
    real_hu = item.scan.hu
    t0 = time.perf_counter()
    protected = {}
    for m in methods:
        got = m.protect(item)
        protected[m.name] = as_stored(got, real_hu) if m.stored else np.asarray(got, np.float32)
        if protected[m.name].shape != real_hu.shape:
            raise MitsError(f"protection method {m.name} returned shape {protected[m.name].shape} "
                            f"for {name} of shape {real_hu.shape}")
        res.perturbation.append({"scan": name, "method": m.name,
                                 **M.perturbation_stats(protected[m.name], real_hu)})
    res.info.setdefault("protect_seconds", {})[name] = time.perf_counter() - t0
    return protected


def _tamper_columns(manip, item, loc, li, real, protected, methods, work, cube, seed, res,
                    attacker) -> dict | None:
    """CT-GAN on the real scan ('none') and every protected one at `loc`: {key: {'slice', 'cube'}}.
    None when the unprotected tamper itself failed (recorded in res.failures)."""
    tampered, errors = {}, {}
    for key, base in [("none", real)] + [(m.name, protected[m.name]) for m in methods]:
        np.copyto(work, base)
        rng = np.random.default_rng([seed, li])  # same draws for every column
        try:
            manip.tamper_volume(work, item.scan.spacing, loc.vox, loc.action, rng)
        except ModelFileError:  # no attacker at all: not a per-sample failure
            raise
        except MitsError as e:  # e.g. AttackShapeError: this sample, this column
            errors[key] = f"{type(e).__name__}: {e}"
            continue
        tampered[key] = {"slice": work[loc.z].copy(), "cube": work[cube].copy()}
    if errors:
        res.failures.append({"scan": loc.scan, "attacker": attacker, "location": asdict(loc), "errors": errors})
        log.warning("tamper failed on %s at %s (%s, %s attacker): %s", loc.scan, loc.vox, loc.action,
                    attacker, errors)
    return None if "none" in errors else tampered


def _image_rows(res, sample, real, protected, tampered, names, cube, window, lpips_model) -> None:
    """The published comparison (real vs each column) on the centre slice and tampered square."""
    z = sample["z"]
    square = (z, cube[1], cube[2])
    for kind, key in _column_keys(names):
        if kind == "protected":
            test_slice = protected[key][z]
        elif key in tampered:
            test_slice = tampered[key]["slice"]
        else:
            continue
        for region in REGIONS:
            r = real[z] if region == "slice" else real[square]
            t = test_slice if region == "slice" else test_slice[square[1:]]
            res.rows.append({**sample, "kind": kind, "method": key, "region": region,
                             **_pair_metrics(r, t, window, lpips_model)})


def _disruption_rows(res, sample, real, protected, tampered, methods, cube, window) -> None:
    """Disruption in the 32 mm cube, and the visibility of the protection in the tampered result:
    SSIM(tampered protected, tampered unprotected) on the tampered square of the centre slice."""
    t_real = tampered["none"]["cube"]
    attack = M.rmse(real[cube], t_real)
    sq = (slice(None), cube[1], cube[2])
    for m in methods:
        if m.name not in tampered:
            continue
        dis = M.rmse(tampered[m.name]["cube"], t_real)
        pert = M.rmse(protected[m.name][cube], real[cube])
        ssim_t = M.ssim(tampered["none"]["slice"][sq[1:]], tampered[m.name]["slice"][sq[1:]], window)
        res.disruption.append({**sample, "method": m.name, "disruption_rmse_hu": dis,
                               "perturbation_rms_cube_hu": pert,
                               "amplification": dis / pert if pert > 0 else float("nan"),
                               "attack_rmse_hu": attack, "ssim_tampered_vs_unprotected": ssim_t})


def _settings_dict(s: EvalSettings) -> dict:
    d = asdict(s)
    d["actions"] = list(s.actions)
    d["window"] = [float(v) for v in s.window]
    d["targets"] = None if s.targets is None else [
        {**r, "zyx": [float(v) for v in r["zyx"]]} for r in s.targets]
    return d


def tradeoff_curve(items: Iterable[VolumeItem], methods_at: Callable[[float], list], manipulator,
                   settings: EvalSettings, eps_list: Sequence[float], *, progress=None) -> dict:
    """Mean disruption per (attacker, method, eps) at the evaluation's locations: for each scan
    and eps, `methods_at(eps)` (methods with the same names at every eps) are evaluated without
    the image tables. Returns {attacker: {method name: {"label", "eps", "disruption",
    "ssim"}}}."""
    quiet = replace(settings, figure=False, image_metrics=False)
    rows = []
    for item in items:
        for eps in eps_list:
            res = evaluate([item], methods_at(eps), manipulator, quiet, progress=progress)
            rows += [{**r, "eps": float(eps), "label": dict(res.methods)[r["method"]]} for r in res.disruption]
    curve: dict = {}
    for r in rows:
        m = curve.setdefault(r["attacker"], {}).setdefault(r["method"], {"label": r["label"], "rows": {}})
        m["rows"].setdefault(r["eps"], []).append(r)
    for per in curve.values():
        for m in per.values():
            eps = sorted(m.pop("rows").items())
            m["eps"] = [e for e, _ in eps]
            m["disruption"] = [_mean([r["disruption_rmse_hu"] for r in rs]) for _, rs in eps]
            m["ssim"] = [_mean([r["ssim_tampered_vs_unprotected"] for r in rs]) for _, rs in eps]
            m["n"] = [len(rs) for _, rs in eps]
    return curve
