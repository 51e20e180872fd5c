"""bench.py's measuring library: the memory meter, the device's matmul peak, the synthetic
phantom, the train / protect / tamper sections and the markdown tables (docs/performance.md).

Every measurement warms up first, then times (CUDA synchronised). Peak memory per measurement:
torch.cuda.max_memory_allocated on a GPU; on the CPU the peak resident set size while it ran
(sampled) and its growth over the start, with the process's CPU seconds and the load average
(wall times on a shared CPU depend on the other jobs)."""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import platform
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import config as config_mod
from generator import build_generator
from procedures.ctgan.models import write_untrained_model_dir
from procedures.attacker.keras_env import get_keras
from procedures.protection.apply import protect_hu
from scanDataset import ScanDataset
from utils.device import pick_device, torch_dtype
from utils.errors import InputFileError, UsageError
from utils.scan_io import Scan, load_scan, save_mhd, save_numpy

SPACING_512 = (2.5, 0.5703125, 0.5703125)   # the z2.5 real scans: 2.5 mm slices, 292 mm field


def default_specs(device) -> tuple[str, str]:
    if device.type == "cuda":
        fast = "amp=bf16:channels_last=true"
        train = (f"paper,paper:attacker_impl=keras,paper:{fast},paper:{fast}:compile=true,paper:{fast}:batch=4,"
                 f"demo:{fast},default,default:{fast}")
        protect = (f"paper:batch=8,paper:batch=8:{fast},paper:batch=8:{fast}:compile=true,"
                   f"default:batch=16,default:batch=16:{fast},default:batch=16:{fast}:compile=true,"
                   f"demo:batch=16:{fast}")
    else:
        train = "paper,paper:attacker_impl=torch,demo,default"
        protect = "demo:batch=4,demo:batch=4:channels_last=true,default:batch=4:channels_last=true:slices=40"
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


# --- measuring -------------------------------------------------------------------------------------
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class Memory:
    """Peak memory of a block: CUDA allocator peak on a GPU; sampled RSS on the CPU. Also the
    process's CPU seconds and the 1-minute load average at the end: on a shared machine, wall
    time is only comparable between runs of similar load."""

    def __init__(self, device):
        self.device = device
        self.result: dict = {}

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base_cuda = torch.cuda.memory_allocated(self.device)
        self._base = self._peak = _rss_bytes() or 0
        self._cpu0 = _cpu_seconds()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        tracemalloc.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __exit__(self, *exc):
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes() or 0)
        mb = 2.0 ** 20
        self.result = {"cpu_s": round(_cpu_seconds() - self._cpu0, 2), "load_avg_1min": _load(),
                       "rss_peak_mb": round(self._peak / mb, 1),
                       "rss_growth_mb": round((self._peak - self._base) / mb, 1),
                       "python_numpy_peak_mb": round(py_peak / mb, 1)}
        if self.device.type == "cuda":
            self.result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / mb, 1)
            self.result["cuda_peak_over_start_mb"] = round(
                (torch.cuda.max_memory_allocated(self.device) - self._base_cuda) / mb, 1)
        return False


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device) -> dict:
    """Measured matmul throughput (FLOP/s) of this device: the yardstick for the FLOP fraction."""
    res = {}
    kinds = [("fp32", torch.float32, False)]
    if device.type == "cuda":
        kinds = [("bf16", torch.bfloat16, False), ("tf32", torch.float32, True), ("fp32", torch.float32, False)]
    n = 8192 if device.type == "cuda" else 2048
    for name, dt, tf32 in kinds:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            a @ b
            sync(device)
            best = float("inf")  # the best of several: other jobs on a shared CPU only slow it down
            for _ in range(5):
                reps = 10 if device.type == "cuda" else 1
                t = time.perf_counter()
                for _ in range(reps):
                    a @ b
                sync(device)
                best = min(best, (time.perf_counter() - t) / reps)
            res[name] = 2 * n ** 3 / best
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    return res


# --- data ------------------------------------------------------------------------------------------
def phantom(shape=(40, 64, 64), seed: int = 0) -> np.ndarray:
    """A chest-like int16 HU volume (the tests' and the benchmark's synthetic scan): body ~40 HU,
    two lungs ~-850 HU, a ~60 HU 'nodule' of radius 3 in the right lung, air outside the body,
    Gaussian noise sd 15 HU. Built slice by slice (the noise drawn in the same order as one
    whole-volume draw) so that a 512x512x300 volume needs no float copy of itself."""
    d, h, w = shape
    rng = np.random.default_rng(seed)
    y, x = np.indices((h, w), dtype=np.float32)
    cz, cy, cx = d / 2, h / 2, w / 2
    body = ((y - cy) / (0.45 * h)) ** 2 + ((x - cx) / (0.48 * w)) ** 2 < 1
    lungs = np.zeros((h, w), bool)
    for sx in (-0.22, 0.22):
        lungs |= ((y - cy) / (0.3 * h)) ** 2 + ((x - cx - sx * w) / (0.16 * w)) ** 2 < 1
    base = np.where(body, 40.0, -1000.0).astype(np.float32)
    vol = np.empty(shape, np.int16)
    for z in range(d):
        sl = base.copy()
        if abs(z - cz) < 0.45 * d:
            sl[lungs] = -850.0
        sl[np.float32((z - cz) ** 2) + (y - cy) ** 2 + (x - cx - 0.22 * w) ** 2 < 9] = 60.0
        sl += rng.normal(0, 15, (h, w)).astype(np.float32)
        vol[z] = np.clip(np.round(sl), -1024, 3071)
    return vol


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

    import train  # lazy: a root script (imports run root -> procedures); only this section times it
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
                run = train.build_run(cfg, size, device, dtype)
                t_build = time.perf_counter() - t_build
                gd, att = [], []
                n = args.warmup + args.steps
                for i in range(n):
                    k = ks[i % len(ks)]
                    # stream j of a step: the same slab for every j (--batch slabs a step)
                    entries = [(j, item, k, k * cfg.slab) for j in range(cfg.batch)]
                    scalars, _ = train.train_step(run, entries, i, seed=0)
                    gd.append(scalars["time/gd_s"])
                    att.append(scalars["time/attack_s"])
                sync(device)
            warm = [g + a for g, a in zip(gd[:args.warmup], att[:args.warmup])]
            gd, att = gd[args.warmup:], att[args.warmup:]
            step = float(np.mean(np.add(gd, att)))
            stats = run.target.stats.as_dict()
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
        _progress(f"train {spec}: " + (row.get("error") or
                  f"{row['step_s']:.3f} s/step (G/D {row['gd_s']:.3f}, attacker {row['attack_s']:.3f})"))
        _free(device)
    return results


# --- protection ------------------------------------------------------------------------------------
PROTECT_KEYS = ("batch", "amp", "channels_last", "compile", "slices")


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
            # FLOPs of one protected slice (convolutions and matmuls: FlopCounterMode's count)
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                x1 = torch.zeros(1, cfg.slab, *hu.shape[1:], device=device, dtype=dtype)
                G(x1, torch.zeros_like(x1), scale=None)
            flops_slice = fc.get_total_flops() / cfg.slab
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
            peak_kind = "bf16" if amp == "bf16" else ("fp16" if amp == "fp16" else
                                                      ("tf32" if device.type == "cuda" and dtype == torch.float32
                                                       and torch.backends.cudnn.allow_tf32 else "fp32"))
            if peak_kind == "fp16" and "bf16" in peaks:
                peak_kind = "bf16"  # same tensor-core rate on Hopper
            if peak_kind not in peaks:  # the CPU: only fp32 is measured
                peak_kind = "fp32"
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
        _progress(f"protect {spec}: " + (row.get("error") or
                  f"{row['wall_s']:.2f} s for {row['shape'][0]} slices ({row['slices_per_s']:.1f} slices/s)"))
        _free(device)
    return results


# --- tampering -------------------------------------------------------------------------------------
def bench_tamper(args, data: dict, models: Path, device) -> list[dict]:
    from procedures.attacker.pipeline import ScanManipulator  # lazy: the attackers pull SciPy
    from procedures.attacker.torch_attacker import TorchScanManipulator
    from procedures.attacker.port import DifferentiableTamper
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
        dt = DifferentiableTamper.from_model_dirs(models / "INJ", models / "REM", device=device,
                                                  resample="spline", clamp="straight_through",
                                                  work_dtype=torch.float32)
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
    _progress(f"tamper torch: {row.get('error') or row}")
    _free(device)
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
    _progress(f"tamper {label}: {row.get('error') or row}")
    _free(device)
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


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_1min": _load()}}

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
        _progress(f"matmul peak: {res['peak_tflops']}")
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
