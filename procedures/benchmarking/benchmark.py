"""bench.py's measuring library: the memory meter, the device's matmul peak, the synthetic
phantom, the train / protect / tamper sections and the markdown tables (docs/performance.md).

Every measurement warms up first, then times (CUDA synchronised). Peak memory per measurement:
torch.cuda.max_memory_allocated on a GPU; on the CPU the peak resident set size while it ran
(sampled) and its growth over the start, with the process's CPU seconds and the load average
(wall times on a shared CPU depend on the other jobs)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import config as config_mod
from generator import build_generator
from procedures.ctgan.models import write_untrained_model_dir
from procedures.attacker.keras_env import get_keras
from procedures.protection.apply import protect_hu
from procedures.protection.step import build_run, train_step
from scanDataset import ScanDataset
from utils.device import pick_device, torch_dtype
from utils.errors import InputFileError, UsageError
from procedures.benchmarking.measure import Memory, free, load_average, peak_flops, progress, sync
from procedures.benchmarking.report import markdown
from utils.phantom import phantom
from utils.scan_io import Scan, load_scan, save_mhd, save_numpy

SPACING_512 = (2.5, 0.5703125, 0.5703125)   # the z2.5 real scans: 2.5 mm slices, 292 mm field


def default_specs(device) -> tuple[str, str]:
    if device.type == "cuda":
        fast = "amp=bf16:channels_last=true"
        train = (f"paper,paper:attacker_impl=keras,paper:{fast},paper:{fast}:compile=true,paper:{fast}:batch=4,"
                 f"demo:{fast},whitebox,whitebox:{fast}")
        protect = (f"paper:batch=8,paper:batch=8:{fast},paper:batch=8:{fast}:compile=true,"
                   f"whitebox:batch=16,whitebox:batch=16:{fast},whitebox:batch=16:{fast}:compile=true,"
                   f"demo:batch=16:{fast}")
    else:
        train = "paper,paper:attacker_impl=torch,demo,whitebox"
        protect = "demo:batch=4,demo:batch=4:channels_last=true,whitebox:batch=4:channels_last=true:slices=40"
    return train, protect


def parse_spec(spec: str) -> tuple[str, dict]:
    preset, *pairs = spec.strip().split(":")
    kv = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"spec {spec!r}: expected field=value, got {pair!r}")
        k, v = pair.split("=", 1)
        kv[k] = v
    return preset, kv


def typed_overrides(kv: dict) -> dict:
    """Strings -> config field types (bools as true/false)."""
    types = {f.name: config_mod._field_type(f) for f in dataclasses.fields(config_mod.Config)}
    out = {}
    for k, v in kv.items():
        if k not in types:
            raise UsageError(f"unknown config field {k!r} in a spec")
        t = types[k]
        out[k] = config_mod._parse_bool(v) if t is bool else t(v)
    return out


# --- data ------------------------------------------------------------------------------------------
def write_scan(hu: np.ndarray, spacing, path: Path) -> Path:
    """.mhd when SimpleITK is installed (what the published loader reads), else .npy + .json."""
    scan = Scan(hu, spacing, (0.0, 0.0, 0.0))
    try:
        import SimpleITK  # noqa: F401  # probe: is SimpleITK installed
    except ImportError:
        return save_numpy(scan, path.with_suffix(".npy"))
    return save_mhd(scan, path.with_suffix(".mhd"))


def prepare_data(args, work: Path) -> dict:
    """{'train_dir', 'protect_hu', 'spacing', 'size', 'label'}."""
    if args.data == "real":
        folder = Path(args.data_dir)
        scans = sorted(folder.glob("*.mhd")) + sorted(folder.glob("*.npy"))
        if not scans:
            raise InputFileError(f"{folder}: no .mhd/.npy scans (run `make data`)")
        scan = max((load_scan(p) for p in scans), key=lambda s: s.hu.shape[0])
        reps = -(-args.protect_slices // scan.hu.shape[0])
        hu = np.concatenate([scan.hu] * reps)[: args.protect_slices]
        return {"train_dir": folder, "protect_hu": hu, "spacing": scan.spacing,
                "size": int(min(scan.hu.shape[1:])),
                "label": f"real: {folder} ({', '.join(p.name for p in scans)}); protected scan = "
                         f"the longest tiled along z to {args.protect_slices} slices"}
    size = args.size
    spacing = (2.5, SPACING_512[1] * 512 / size, SPACING_512[2] * 512 / size)
    folder = work / f"synthetic_{size}x{size}x{args.depth}"
    if not any(folder.glob("phantom.*")):
        folder.mkdir(parents=True, exist_ok=True)
        write_scan(phantom((args.depth, size, size), seed=0), spacing, folder / "phantom")
    return {"train_dir": folder, "protect_hu": phantom((args.protect_slices, size, size), seed=1),
            "spacing": np.asarray(spacing), "size": size,
            "label": f"synthetic phantom {size}x{size}x{args.depth} (training), "
                     f"{size}x{size}x{args.protect_slices} (protection); spacing {spacing} mm"}


def ctgan_models(args, work: Path, sample_hu: np.ndarray) -> tuple[Path, str]:
    """models_dir with INJ/ and REM/: the given one, or untrained ones of width --ctgan_gf."""
    given = Path(args.models_dir) if args.models_dir else None
    if given is not None and all((given / sub / "G_model.h5").is_file() for sub in ("INJ", "REM")):
        return given, f"{given} (gf {_h5_width(given / 'INJ' / 'G_model.h5')})"
    root = work / f"ctgan_gf{args.ctgan_gf}"
    if not all((root / sub / "G_model.h5").is_file() for sub in ("INJ", "REM")):
        keras = get_keras(args.keras_backend or None)
        d, h, w = sample_hu.shape
        cubes = np.stack([sample_hu[d // 2 - 16:d // 2 + 16, y:y + 32, x:x + 32]
                          for y in (h // 3, h // 2) for x in (w // 4, w // 2)])
        for i, sub in enumerate(("INJ", "REM")):
            write_untrained_model_dir(root / sub, args.ctgan_gf, keras, cubes, seed=i)
    return root, f"untrained, gf {args.ctgan_gf} (built in {root})"


def _h5_width(path: Path):
    """CT-GAN generator width gf: the output channels of the first Conv3D on 1 channel."""
    import h5py  # lazy: h5py only to read a .h5 model
    found = []

    def visit(name, obj):
        if not found and isinstance(obj, h5py.Dataset) and "kernel" in name and obj.ndim == 5 and obj.shape[3] == 1:
            found.append(int(obj.shape[-1]))
    try:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    except OSError:
        return "?"
    return found[0] if found else "?"


# --- training --------------------------------------------------------------------------------------
def eligible_subbatches(depth: int, slab: int) -> list[int]:
    """Sub-batch indices k whose first slice s = k * slab passes the published near-end rule."""
    return [k for k in range(depth // slab) if 32 < k * slab and k * slab + 32 < depth]


def bench_train(args, data: dict, models: Path, device, specs: list[str]) -> list[dict]:
    results = []
    for spec in specs:
        preset, kv = parse_spec(spec)
        row = {"spec": spec}
        try:
            cfg = config_mod.make_config(preset, **{
                "data_dir": str(data["train_dir"]), "models_dir": str(models), "device": str(device),
                "progress": False, "seed": 0, "keras_backend": args.keras_backend,
                **typed_overrides(kv)})
            dtype = torch_dtype(cfg.dtype)
            ds = ScanDataset(cfg.data_dir, dtype=dtype)
            items = [ds[i] for i in range(len(ds))]
            item = max(items, key=lambda it: it.volume.shape[0])
            ks = eligible_subbatches(item.volume.shape[0], cfg.slab)
            if not ks:
                raise UsageError(f"{item.path}: {item.volume.shape[0]} slices: no sub-batch passes the "
                                 "near-end rule (needs >= 69)")
            size = min(min(it.volume.shape[1:]) for it in items)
            with Memory(device) as mem:
                t_build = time.perf_counter()
                torch.manual_seed(0)
                run = build_run(cfg, size, device, dtype)
                t_build = time.perf_counter() - t_build
                gd, att = [], []
                n = args.warmup + args.steps
                for i in range(n):
                    k = ks[i % len(ks)]
                    # stream j of a step: the same slab for every j (--batch slabs a step)
                    entries = [(j, item, k, k * cfg.slab) for j in range(cfg.batch)]
                    scalars, _ = train_step(run, entries, i, seed=0)
                    gd.append(scalars["time/gd_s"])
                    att.append(scalars["time/attack_s"])
                sync(device)
            warm = [g + a for g, a in zip(gd[:args.warmup], att[:args.warmup])]
            gd, att = gd[args.warmup:], att[args.warmup:]
            step = float(np.mean(np.add(gd, att)))
            stats = run.disruption.stats.as_dict()
            row.update({
                "preset": preset, "generator": cfg.generator, "g_width": cfg.g_width,
                "discriminator": cfg.discriminator, "dtype": cfg.dtype, "amp": cfg.amp,
                "channels_last": cfg.channels_last, "compile": cfg.compile, "attack_mode": cfg.attack_mode,
                "batch": cfg.batch, "slab": cfg.slab, "volume": Path(item.path).name,
                "sub_batches": [ks[i % len(ks)] for i in range(n)],
                "build_s": t_build, "warmup_step_s": warm,
                "gd_s": float(np.mean(gd)), "attack_s": float(np.mean(att)), "step_s": step,
                "steps_per_s": 1.0 / step, "slices_per_s": cfg.batch * cfg.slab / step,
                "gd_s_each": gd, "attack_s_each": att,
                "attacker": {"computed": stats["computed"], "of": stats["sub_batches"],
                             "errors": stats["errors"]},
                "memory": mem.result})
            del run
        except Exception as e:  # one failing configuration must not cost the others' numbers
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        results.append(row)
        progress(f"train {spec}: " + (row.get("error") or
                  f"{row['step_s']:.3f} s/step (G/D {row['gd_s']:.3f}, attacker {row['attack_s']:.3f})"))
        free(device)
    return results


# --- protection ------------------------------------------------------------------------------------
PROTECT_KEYS = ("batch", "amp", "channels_last", "compile", "slices")


def _flops_per_slice(G, cfg, size, device, dtype) -> float:
    """FLOPs of one protected slice (convolutions and matmuls: FlopCounterMode's count)."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        x1 = torch.zeros(1, cfg.slab, *size, device=device, dtype=dtype)
        G(x1, torch.zeros_like(x1), scale=None)
    return fc.get_total_flops() / cfg.slab


def _peak_kind(amp: str, device, dtype, peaks: dict) -> str:
    """Which measured matmul peak a protection run is compared with."""
    if amp in ("bf16", "fp16"):
        kind = amp
    else:
        kind = ("tf32" if device.type == "cuda" and dtype == torch.float32
                and torch.backends.cudnn.allow_tf32 else "fp32")
    if kind == "fp16" and "bf16" in peaks:
        kind = "bf16"  # same tensor-core rate on Hopper
    return kind if kind in peaks else "fp32"  # the CPU: only fp32 is measured


def bench_protect(args, data: dict, device, specs: list[str], peaks: dict) -> list[dict]:
    results = []
    for spec in specs:
        preset, kv = parse_spec(spec)
        row = {"spec": spec}
        try:
            opts = {k: kv.pop(k) for k in PROTECT_KEYS if k in kv}
            hu = data["protect_hu"][: int(opts.get("slices", data["protect_hu"].shape[0]))]
            batch = int(opts.get("batch", 4))
            amp = opts.get("amp", "off")
            cl = config_mod._parse_bool(opts.get("channels_last", "false"))
            comp = config_mod._parse_bool(opts.get("compile", "false"))
            cfg = config_mod.make_config(preset, **typed_overrides(kv))
            dtype = torch_dtype(cfg.dtype)
            torch.manual_seed(0)
            G = build_generator(cfg).to(device=device, dtype=dtype).eval()
            if cfg.generator == "unet":  # leave the zero start: a real, non-zero perturbation
                torch.nn.init.normal_(G.out.weight, 0.0, 0.02)
            flops_slice = _flops_per_slice(G, cfg, hu.shape[1:], device, dtype)
            if cl:
                G = G.to(memory_format=torch.channels_last)
            run_G = torch.compile(G) if comp else G
            out = np.empty(hu.shape, np.int16)
            kw = dict(dtype=dtype, seed=0, batch=batch, amp=amp, channels_last=cl)
            with Memory(device) as mem:
                t = time.perf_counter()
                warm = hu[: cfg.slab * batch * 2]  # warm-up (and compilation): two calls' worth
                for _ in range(max(1, args.warmup)):
                    protect_hu(run_G, warm, cfg, device, out=np.empty(warm.shape, np.int16), **kw)
                sync(device)
                warm_s = time.perf_counter() - t
                t = time.perf_counter()
                protect_hu(run_G, hu, cfg, device, out=out, **kw)
                sync(device)
                wall = time.perf_counter() - t
            rate = hu.shape[0] / wall
            peak_kind = _peak_kind(amp, device, dtype, peaks)
            peak = peaks.get(peak_kind)
            changed = float(np.mean(out != hu))
            row.update({"preset": preset, "generator": cfg.generator, "g_width": cfg.g_width, "dtype": cfg.dtype,
                        "batch": batch, "amp": amp, "channels_last": cl, "compile": comp,
                        "shape": list(hu.shape), "wall_s": wall, "slices_per_s": rate,
                        "wall_300_s": 300 / rate, "warmup_s": warm_s,
                        "gflop_per_slice": flops_slice / 1e9,
                        "achieved_tflops": flops_slice * rate / 1e12,
                        "peak_kind": peak_kind, "peak_tflops": (peak or 0) / 1e12,
                        "peak_fraction": flops_slice * rate / peak if peak else None,
                        "voxels_changed": changed, "memory": mem.result})
            del G, run_G
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        results.append(row)
        progress(f"protect {spec}: " + (row.get("error") or
                  f"{row['wall_s']:.2f} s for {row['shape'][0]} slices ({row['slices_per_s']:.1f} slices/s)"))
        free(device)
    return results


# --- tampering -------------------------------------------------------------------------------------
def bench_tamper(args, data: dict, models: Path, device) -> list[dict]:
    from procedures.attacker.pipeline import ScanManipulator  # lazy: the attackers pull SciPy
    from procedures.attacker.torch_attacker import TorchScanManipulator
    from procedures.attacker.model_dir import load_attacker_pair
    hu = data["protect_hu"][:max(80, min(120, data["protect_hu"].shape[0]))].astype(np.float32)
    spacing = data["spacing"]
    d, h, w = hu.shape
    center = (d // 2, h // 2, int(0.28 * w))   # in the right lung of the phantom
    results = [
        # Keras (the published attacker; black box on the CPU, tamper.py on the CPU)
        _pipeline_row(f"keras ({args.keras_backend or 'default backend'}) ScanManipulator.tamper_volume",
                      lambda: ScanManipulator(models, backend=args.keras_backend or None), hu, spacing,
                      center, args, device),
        # its torch equal on the device (black box and tamper.py on a GPU)
        _pipeline_row("torch TorchScanManipulator.tamper_volume (procedures.attacker.torch_attacker)",
                      lambda: TorchScanManipulator(models, device=device), hu, spacing, center, args, device)]

    # PyTorch port (the white-box attacker): footprints of one location, then + backward
    row = {"attacker": "torch DifferentiableTamper.footprints (spline resample, float32, no touch-ups)"}
    try:
        dt = load_attacker_pair(models, device)
        vol = torch.from_numpy(hu).to(device)
        per, per_bwd = {}, {}
        with Memory(device) as mem:
            for action in ("inject", "remove"):
                ts, tb = [], []
                for i in range(args.warmup + args.tamper_reps):
                    sync(device)
                    t = time.perf_counter()
                    with torch.no_grad():
                        dt.footprints(vol, spacing, center, action)
                    sync(device)
                    ts.append(time.perf_counter() - t)
                    v = vol.clone().requires_grad_(True)
                    sync(device)
                    t = time.perf_counter()
                    part = dt.footprints(v, spacing, center, action)[0][0]
                    part.pow(2).mean().backward()
                    sync(device)
                    tb.append(time.perf_counter() - t)
                per[action], per_bwd[action] = ts[args.warmup:], tb[args.warmup:]
        row.update({"inject_ms": 1e3 * float(np.median(per["inject"])),
                    "remove_ms": 1e3 * float(np.median(per["remove"])),
                    "inject_fwd_bwd_ms": 1e3 * float(np.median(per_bwd["inject"])),
                    "remove_fwd_bwd_ms": 1e3 * float(np.median(per_bwd["remove"])),
                    "memory": mem.result})
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    results.append(row)
    progress(f"tamper torch: {row.get('error') or row}")
    free(device)
    return results


# --- report ----------------------------------------------------------------------------------------
def _pipeline_row(label: str, make, hu, spacing, center, args, device) -> dict:
    """Latency of a whole tamper (ScanManipulator-like `make()`) per action, and of its
    inject generator alone on one 32^3 cube."""
    row = {"attacker": label}
    try:
        manip = make()
        gen = manip.model("inject")
        if hasattr(gen, "keras"):
            row["keras_backend"] = gen.keras.backend.backend()
        vol = hu.copy()
        per = {}
        with Memory(device) as mem:
            for action in ("inject", "remove"):
                ts = []
                for i in range(args.warmup + args.tamper_reps):
                    t = time.perf_counter()
                    changed = manip.tamper_volume(vol, spacing, center, action, np.random.default_rng(i))
                    sync(device)
                    ts.append(time.perf_counter() - t)
                    vol[changed] = hu[changed]  # restore (not timed)
                per[action] = ts[args.warmup:]
            ts = _time_generator(gen, args.tamper_reps, device)
        row.update({"inject_ms": 1e3 * float(np.median(per["inject"])),
                    "remove_ms": 1e3 * float(np.median(per["remove"])),
                    "generator_ms": 1e3 * float(np.median(ts)),
                    "each_ms": {k: [1e3 * v for v in vs] for k, vs in per.items()}, "memory": mem.result})
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    progress(f"tamper {label}: {row.get('error') or row}")
    free(device)
    return row


def _time_generator(gen, reps: int, device) -> list[float]:
    """Seconds per call of a CT-GAN generator on one zero 32^3 cube (after one warm-up)."""
    if hasattr(gen, "generate"):   # attack_pipeline.CTGANModel (Keras)
        cube = np.zeros((1, 32, 32, 32, 1), np.float32)
        call = lambda: gen.generate(cube)  # noqa: E731
    else:                          # ctgan_torch.DifferentiableTamper
        net = gen.generators["inject"]
        cube = torch.zeros(1, 1, 32, 32, 32, device=device)
        call = lambda: net(cube)  # noqa: E731
    ts = []
    with torch.inference_mode():
        for i in range(reps + 1):
            t = time.perf_counter()
            call()
            sync(device)
            ts.append(time.perf_counter() - t)
    return ts[1:]


def run_sections(args, sections: set, command: str) -> dict:
    """Measure the named sections (bench.py's arguments); results also in <out>/bench.json and
    bench.md, saved after every section so that a run cut short keeps what it measured."""
    device = pick_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.keras_backend:
        os.environ.setdefault("KERAS_BACKEND", args.keras_backend)
    train_specs, protect_specs = default_specs(device)
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    res = {"command": command,
           "environment": {
               "device": str(device), "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                                      else platform.processor() or platform.machine()),
               "torch": torch.__version__, "python": platform.python_version(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_1min": load_average()}}

    def save():
        (out / "bench.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        (out / "bench.md").write_text(markdown(res) + "\n")

    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # tf.function retracing notices
    data = prepare_data(args, work)
    res["data"] = data["label"]
    models, res["ctgan_models"] = (None, "")
    if sections & {"train", "tamper"}:
        models, res["ctgan_models"] = ctgan_models(args, work, data["protect_hu"])
    if "protect" in sections:
        res["peak_tflops"] = {k: v / 1e12 for k, v in peak_flops(device).items()}
        progress(f"matmul peak: {res['peak_tflops']}")
    if "train" in sections:
        specs = [s for s in (args.train or train_specs).split(",") if s.strip()]
        rows = bench_train(args, data, models, device, ([args.reference] if args.reference else []) + specs)
        if args.reference:
            rows[0]["is_reference"] = True
        ref = rows[0] if args.reference and "error" not in rows[0] else None
        for r in rows:
            if ref is not None and "error" not in r:
                r["speedup_vs_reference"] = ref["step_s"] / r["step_s"]
        res["train"] = rows
        save()
    if "protect" in sections:
        specs = [s for s in (args.protect or protect_specs).split(",") if s.strip()]
        res["protect"] = bench_protect(args, data, device, specs,
                                       {k: v * 1e12 for k, v in res["peak_tflops"].items()})
        save()
    if "tamper" in sections:
        res["tamper"] = bench_tamper(args, data, models, device)
    save()
    return res
