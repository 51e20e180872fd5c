"""Evaluate protection methods against CT-GAN tampering: the published tables (docs/results.md)
plus the perturbation size and the disruption of the attack.

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

A protection method is a ProtectionMethod: a name, a column label and a callable
(VolumeItem) -> protected HU array of the scan's shape. Adding one (e.g. TAFIM) is one entry in
the list given to `evaluate`.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from procedures.protection.apply import protect_hu
from procedures.protection.targeted import TargetSettings, background, offset_grid, protect_targets, targets_for_scan
from scanDataset import VolumeItem
from utils import metrics as M
from utils.atomic import atomic_path, atomic_write_text
from utils.cubes import cube_bounds
from utils.errors import InputFileError, MitsError, ModelFileError, UsageError
from utils.lung import lung_mask
from utils.resample import scaled_shape

log = logging.getLogger("mitsgan.evaluation")

CUBE_MM = 32.0  # CT-GAN's cube side (docs/attack.md#cube-geometry)
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


# ----------------------------------------------------------------------------------------------
# protection methods
# ----------------------------------------------------------------------------------------------
@dataclass
class ProtectionMethod:
    name: str                                        # short key: mitsgan, noise, tafim, ...
    label: str                                       # column label in the tables
    protect: Callable[[VolumeItem], np.ndarray]      # protected HU, shape of item.scan.hu
    stored: bool = True                              # False: evaluated in float, not rounded to int16

    def __post_init__(self):
        self.protect = _last_item_cache(self.protect)


def _last_item_cache(fn):
    """Remember the result for the last item only: methods that build on another (the matched
    noise) reuse its output without keeping every scan in memory."""
    if getattr(fn, "_cached", False):
        return fn
    memo: dict = {}

    def wrapped(item: VolumeItem) -> np.ndarray:
        key = (item.path, id(item))
        if memo.get("key") != key:
            memo.clear()
            memo["value"] = fn(item)
            memo["key"] = key
        return memo["value"]

    wrapped._cached = True
    return wrapped


def as_stored(hu: np.ndarray, like: np.ndarray) -> np.ndarray:
    """What a hospital would store: rounded and clipped to the source's integer type (int16 CT),
    returned as float32 for the attack."""
    hu = np.asarray(hu)
    if np.issubdtype(like.dtype, np.integer):
        info = np.iinfo(like.dtype)
        hu = np.clip(np.rint(hu), info.min, info.max)
    return hu.astype(np.float32, copy=False)


def mitsgan_method(G, cfg, device, dtype, *, seed: int = 0, batch: int = 4, progress=None,
                   label: str = "MITS-GAN", name: str = "mitsgan", stored: bool = True) -> ProtectionMethod:
    """Protection with a trained MITS-GAN generator (procedures.protection.apply.protect_hu).
    stored=False keeps the float32 output (what the network made, before int16 storage rounds
    it): the float-vs-stored comparison (docs/results.md)."""
    def run(item: VolumeItem) -> np.ndarray:
        hu = item.scan.hu
        integer = stored and np.issubdtype(hu.dtype, np.integer)
        out = np.empty(hu.shape, dtype=hu.dtype if integer else np.float32)
        return protect_hu(G, hu, cfg, device, hu_min=item.hu_min, hu_max=item.hu_max, dtype=dtype,
                          seed=seed, batch=batch, out=out, progress=progress,
                          desc=f"protect {Path(item.path).name}")

    return ProtectionMethod(name, label, run, stored=stored)


def gaussian_noise_method(rms_hu: float | Callable[[VolumeItem], float], *, seed: int = 0,
                          label: str = "Gaussian noise") -> ProtectionMethod:
    """Baseline: i.i.d. Gaussian noise of the given RMS in HU (a number, or a function of the
    item, e.g. matched_rms(mitsgan) for the same RMS as MITS-GAN's perturbation of that scan).
    Seeded by (seed, scan name)."""
    def run(item: VolumeItem) -> np.ndarray:
        sigma = float(rms_hu(item) if callable(rms_hu) else rms_hu)
        rng = np.random.default_rng([int(seed), zlib.crc32(Path(item.path).name.encode())])
        hu = item.scan.hu
        out = hu.astype(np.float32)
        for z in range(hu.shape[0]):  # slice by slice: no whole-volume float64 temporary
            out[z] += rng.standard_normal(hu.shape[1:], dtype=np.float32) * np.float32(sigma)
        return out

    return ProtectionMethod("noise", label, run)


def random_signs_method(eps_hu: float, *, seed: int = 0, label: str | None = None,
                        name: str = "signs") -> ProtectionMethod:
    """Baseline: random +-eps HU on every voxel (the largest RMS an L-inf bound of eps allows,
    no learning). Seeded by (seed, scan name)."""

    def run(item: VolumeItem) -> np.ndarray:  # the targeted protection's background "signs"
        return background(item.scan.hu, TargetSettings(eps=eps_hu, seed=seed), Path(item.path).name)

    return ProtectionMethod(name, label or f"random +-{eps_hu:g} HU signs", run)


def eps_scaled_method(base: ProtectionMethod, eps_hu: float, bound_hu: float, *, name: str,
                      label: str) -> ProtectionMethod:
    """A generator's protection at another bound, from its float output `base` (computed once
    per scan): a bounded generator (x + eps * tanh(r), bound_hu > 0) scales its perturbation by
    eps / bound_hu, which is what running it with that bound gives before storage; an unbounded
    one has its perturbation clipped to +-eps. Stored as int16 like every column."""
    def run(item: VolumeItem) -> np.ndarray:
        hu = item.scan.hu
        out = base.protect(item).astype(np.float32, copy=True)
        for z in range(hu.shape[0]):
            d = out[z] - hu[z]
            d = d * np.float32(eps_hu / bound_hu) if bound_hu > 0 else np.clip(d, -eps_hu, eps_hu)
            out[z] = hu[z] + d
        return out

    return ProtectionMethod(name, label, run)


def targeted_method(attacker, rows, settings, *, label: str | None = None, name: str = "targeted",
                    progress=None, boxes: dict | None = None) -> ProtectionMethod:
    """Targeted protection (procedures.protection.targeted) of the targets CSV rows of each scan, its
    settings.background elsewhere. `attacker`: a procedures.attacker.port.DifferentiableTamper
    (the seen attacker). `boxes`: a cache shared by methods of equal settings but background."""
    boxes = {} if boxes is None else boxes  # scan path -> [(box, d)]: small, reused

    def run(item: VolumeItem) -> np.ndarray:
        if item.path not in boxes:
            centres = targets_for_scan(rows, item.scan, Path(item.path).name, strict=False)
            _, info = protect_targets(attacker, item.scan.hu, item.scan.spacing, centres, settings,
                                      progress=progress, keep=True)
            boxes[item.path] = [(i["slices"], i["d"]) for i in info]
        out = background(item.scan.hu, settings, Path(item.path).name)
        for box, d in boxes[item.path]:
            out[box] = item.scan.hu[box].astype(np.float32) + d
        return out

    return ProtectionMethod(name, label or f"targeted, eps {settings.eps:g} HU", run)


def matched_rms(method: ProtectionMethod) -> Callable[[VolumeItem], float]:
    """The RMS (HU) of `method`'s perturbation of an item, as stored."""
    def rms(item: VolumeItem) -> float:
        return M.perturbation_stats(as_stored(method.protect(item), item.scan.hu), item.scan.hu)["rms_hu"]

    return rms


# ----------------------------------------------------------------------------------------------
# tamper locations
# ----------------------------------------------------------------------------------------------
@dataclass
class Location:
    scan: str
    z: int
    y: int
    x: int
    action: str
    source: str          # "lung mask" or the CSV's name

    @property
    def vox(self) -> tuple[int, int, int]:
        return (self.z, self.y, self.x)


def _csv_locations(item: VolumeItem, path: Path) -> list[tuple[int, int, int]]:
    """Rows of a project CSV (filename, z, y, x[, coord vox|world]) for this scan, as voxels."""
    name = Path(item.path).name
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if Path(row.get("filename", "")).name != name:
                continue
            try:
                c = np.array([float(row["z"]), float(row["y"]), float(row["x"])])
            except (KeyError, ValueError):
                raise InputFileError(f"{path}: bad row {row}") from None
            if (row.get("coord") or "vox").strip().lower() == "world":
                c = item.scan.world2vox(c)
            v = tuple(int(np.floor(t)) for t in c)
            if all(0 <= t < s for t, s in zip(v, item.scan.hu.shape)):
                out.append(v)
    return out


# Evaluation draws come from their own stream: train.py seeds every step with
# SeedSequence([seed, step, rank]); this tag as the first entropy word keeps evaluation
# locations independent of anything training drew (docs/results.md).
EVAL_STREAM = 0x4D455641


def target_locations(item: VolumeItem, rows, n: int, rng, actions, radius: int = 2) -> list[Location]:
    """Held-out cube centres around the targets: n offsets per target within +-radius voxels,
    drawn without replacement from the offsets of odd parity ((oz + oy + ox) odd), which the
    targeted protection under evaluation never optimises for (it uses the even ones)."""
    name = Path(item.path).name
    grid = offset_grid(radius, parity=1)
    hi = np.asarray(item.scan.hu.shape) - 1
    out = []
    for t in targets_for_scan(rows, item.scan, name, strict=False):
        offs = grid[rng.choice(len(grid), size=min(n, len(grid)), replace=False)]
        for o in offs:
            v = tuple(int(c) for c in np.clip(np.asarray(t) + o, 0, hi))
            out += [Location(name, *v, action=a, source=f"target {t} + {tuple(int(c) for c in o)}")
                    for a in actions]
    return out


def sample_locations(item: VolumeItem, n: int, *, seed: int = 0, mode: str = "lung",
                     actions: Sequence[str] = ("inject", "remove"), csv_dir=None,
                     targets=None) -> list[Location]:
    """N tamper locations for one scan, each tampered with every action, drawn from the
    evaluation stream (EVAL_STREAM, seed, scan name).

    mode "lung": N voxels drawn from utils.lung.lung_mask, preferring centres whose 32 mm cube
    stays inside the scan along z.
    mode "csv": inject at the folder's healthy.csv rows, remove at its nodules.csv rows (at most
    N each, seeded choice): the attacker injects into healthy lung and removes a real nodule.
    mode "targets": N held-out offsets around each target row (procedures.protection.targeted rows) of
    this scan (target_locations): a hand-placed attack on a known finding."""
    name = Path(item.path).name
    rng = np.random.default_rng([EVAL_STREAM, int(seed), zlib.crc32(name.encode())])
    if mode == "targets":
        if targets is None:
            raise UsageError("location mode 'targets' needs the targets CSV rows")
        return target_locations(item, targets, n, rng, actions)
    if mode == "csv":
        folder = Path(csv_dir) if csv_dir is not None else Path(item.path).parent
        out = []
        for action, fname in (("inject", "healthy.csv"), ("remove", "nodules.csv")):
            if action not in actions:
                continue
            p = folder / fname
            if not p.is_file():
                raise InputFileError(f"{p}: not found (needed by --locations csv)")
            rows = _csv_locations(item, p)
            if len(rows) > n:
                rows = [rows[i] for i in sorted(rng.choice(len(rows), n, replace=False))]
            out += [Location(name, *v, action=action, source=fname) for v in rows]
        return out
    if mode != "lung":
        raise UsageError(f"unknown location mode {mode!r}; choose lung, csv or targets")
    hu = item.scan.hu
    cand = np.argwhere(lung_mask(hu))
    if len(cand) == 0:
        raise MitsError(f"{item.path}: no lung found (utils.lung.lung_mask is empty); "
                        f"use --locations csv")
    half = int(scaled_shape([CUBE_MM], 1.0 / item.scan.spacing[0])[0]) // 2
    inner = cand[(cand[:, 0] >= half) & (cand[:, 0] < hu.shape[0] - half)]
    if len(inner) >= n:
        cand = inner
    picks = cand[rng.choice(len(cand), size=min(n, len(cand)), replace=False)]
    return [Location(name, int(z), int(y), int(x), action=a, source="lung mask")
            for z, y, x in picks for a in actions]


def cube_region(spacing, center, vol_shape) -> tuple[slice, slice, slice]:
    """The 32 mm cube around `center` (CT-GAN's cut: round(32 / spacing) voxels), clipped."""
    shape = scaled_shape([CUBE_MM] * 3, 1.0 / np.asarray(spacing, dtype=np.float64))
    _, _, a, b = cube_bounds(center, np.maximum(shape, 1), vol_shape)
    return tuple(slice(int(lo), int(hi)) for lo, hi in zip(a, b))


# ----------------------------------------------------------------------------------------------
# the evaluation
# ----------------------------------------------------------------------------------------------
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


def _column_keys(names: Sequence[str]) -> list[tuple[str, str]]:
    """(kind, method name) of every compared column, in table order; 'none' = unprotected."""
    return [("protected", n) for n in names] + [("tampered", n) for n in names] + [("tampered", "none")]


def column_label(kind: str, name: str, labels: dict) -> str:
    if name == "none":
        return "tampered, unprotected (CT-GAN(real))"
    return f"{kind} {labels[name]}"


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


# ----------------------------------------------------------------------------------------------
# aggregation and reports
# ----------------------------------------------------------------------------------------------
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


def markdown_report(res: EvalResult, summary: dict, extra_sections: Sequence[str] = ()) -> str:
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


# ----------------------------------------------------------------------------------------------
# disruption vs eps
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# qualitative figure
# ----------------------------------------------------------------------------------------------
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
