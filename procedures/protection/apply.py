"""Protect whole volumes with a trained MITS-GAN generator and export them in HU.

A volume is processed in slabs of `slab` consecutive slices; the last slab is aligned to the
end of the volume so that every slice is protected (the published loop never uses the last
depth % 4 slices). Protection streams: only one batch of slabs is normalised and run at a time,
and protected HU are written straight into the output array (int16 for int16 scans) under
inference mode, so a scan needs its own size twice plus one batch of activations (no graph is
kept: memory does not grow with the number of slices).
The noise delta of each slab is a counter-based hash of (seed, first slice, voxel), computed
where the generator runs, so the protected scan does not depend on the batch size or the device.
On a GPU the scan crosses the bus once each way in its own dtype (int16), and normalisation,
noise and the mapping back to HU run on the GPU (docs/performance.md; bench.py measures it). Exported scans keep the source geometry and, for DICOM sources, metadata.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import config as config_mod
from generator import build_generator
from scanDataset import VolumeItem
from utils.checkpoint import load_checkpoint
from utils.device import torch_dtype
from utils.errors import ModelFileError, ScanFormatError, UsageError
from utils.hu_range import span, to_hu, to_net
from utils.scan import check_min_size
from utils.scan_io import Scan, save_dicom_series, save_mhd
from utils.scan_paths import scan_stem
from utils.stored import int_limits, stored_as


def slab_starts(depth: int, slab: int) -> list[int]:
    """Start index of every slab covering [0, depth); the last one ends at depth."""
    if depth < slab:
        raise ValueError(f"volume has {depth} slices, fewer than a slab of {slab}")
    starts = list(range(0, depth - slab + 1, slab))
    if starts[-1] + slab < depth:
        starts.append(depth - slab)
    return starts


def check_generator_fits(G: torch.nn.Module, slab: int, hu: np.ndarray, path="the scan") -> None:
    """Refuse a volume the generator cannot protect, before any work: fewer slices than a slab,
    slices smaller than the U-Net's bottleneck factor (2^depth: below it the deepest layers see
    padding only), or a volume of one value (the output is kept within the scan's own value
    range, so nothing could change). docs/safety.md#what-a-scan-may-be."""
    depth = int(getattr(G, "depth", 0) or 0)
    side = 2 ** depth
    why = f"it protects slabs of {slab} slices"
    if depth:
        why += f" of at least {side} x {side} pixels"
    check_min_size(hu.shape, (slab, side, side), path, "the generator", why)
    if hu.size and np.min(hu) == np.max(hu):
        raise ScanFormatError(f"{path}: every voxel is {float(np.min(hu)):g} HU; the generator "
                              f"keeps values within the scan's own range, so nothing could be "
                              f"protected")


def slabs_meeting(depth: int, slab: int, z_lo: int, z_hi: int) -> list[int]:
    """Starts of the protection tiling's slabs (slab_starts) that meet slices [z_lo, z_hi): the
    slabs a protected scan has perturbed inside a tampered cube's z-range."""
    return [s for s in slab_starts(depth, slab) if s < z_hi and s + slab > z_lo]


def _eps_scale(cfg, hu_min: float, hu_max: float) -> float | None:
    if cfg.eps_hu <= 0:
        return None
    return 2.0 * cfg.eps_hu / span(hu_min, hu_max)


def eps_scale(cfg, item: VolumeItem) -> float | None:
    """The perturbation bound in normalised units (None = unbounded)."""
    return _eps_scale(cfg, item.hu_min, item.hu_max)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow (16-bit halves of c)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32): the same bits on every device."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _slab_keys(seed: int, starts) -> np.ndarray:
    return np.array([np.random.SeedSequence([int(seed), int(s)]).generate_state(2, np.uint32)
                     for s in starts], dtype=np.uint32).reshape(-1, 2)


def _noise_numpy(keys: np.ndarray, n: int) -> np.ndarray:
    """slab_noise on the CPU: uint32 arithmetic wraps mod 2^32 by definition (~7 ms a 512^2 x 4
    slab, where torch's int64 ops take ~300 ms)."""
    idx = np.arange(n, dtype=np.uint32)
    out = np.empty((len(keys), n), dtype=np.float32)
    for b, (k1, k2) in enumerate(keys):
        x = idx + k1
        for key in (None, k2):
            if key is not None:
                x ^= key
            x ^= x >> np.uint32(16)
            x *= np.uint32(0x7FEB352D)
            x ^= x >> np.uint32(15)
            x *= np.uint32(0x846CA68B)
            x ^= x >> np.uint32(16)
        np.multiply(x >> np.uint32(8), np.float32(1.0 / 2**24), out=out[b], casting="unsafe")
    return out


def _noise_torch(keys: np.ndarray, n: int, device) -> torch.Tensor:
    """slab_noise on a GPU, the same bits in int64 arithmetic (values kept below 2^32)."""
    k = torch.from_numpy(keys.astype(np.int64)).to(device)
    idx = torch.arange(n, device=device, dtype=torch.int64).unsqueeze(0)
    h = _mix32(_mix32((idx + k[:, :1]) & _M32) ^ k[:, 1:])
    return (h >> 8).to(torch.float32) * (1.0 / 2**24)


def slab_noise(seed: int, starts, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Uniform [0, 1) noise delta (len(starts), *shape) for the slabs starting at `starts`: voxel i
    of slab s gets the top 24 bits (as torch.rand's float32) of a 32-bit hash of (i, key(seed, s)),
    computed on `device`. Depends only on (seed, s, i): not on the batch, the device or other slabs.
    """
    device = torch.device(device)
    keys, n = _slab_keys(seed, starts), int(np.prod(shape))
    u = (
        torch.from_numpy(_noise_numpy(keys, n))
        if device.type == "cpu"
        else _noise_torch(keys, n, device)
    )
    return u.to(dtype).reshape(len(starts), *shape)


_TORCH_INPUT = (np.uint8, np.int16, np.int32, np.int64, np.float32, np.float64)


def _autocast(device: torch.device, amp: str):
    if amp in ("", "off", None):
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise UsageError(f"amp must be off, bf16 or fp16, not {amp!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def value_range(hu: np.ndarray, hu_min=None, hu_max=None) -> tuple[float, float]:
    """The normalisation range: the volume's own unless given."""
    lo = float(hu.min()) if hu_min is None else float(hu_min)
    hi = float(hu.max()) if hu_max is None else float(hu_max)
    return lo, hi


class OutputRange(NamedTuple):
    lo: float                        # the normalisation range in HU
    hi: float
    out: np.ndarray                  # receives the protected HU
    limits: tuple[int, int] | None   # out's integer range (None: a float output)


def output_range(hu: np.ndarray, hu_min, hu_max, out) -> OutputRange:
    """Shared set-up of slab-wise protection: the normalisation range (the volume's own unless
    given), the output array (float32 by default) and its integer limits (None for floats)."""
    lo, hi = value_range(hu, hu_min, hu_max)
    if out is None:
        out = np.empty(hu.shape, dtype=np.float32)
    if out.shape != hu.shape:
        raise ValueError(f"output of shape {out.shape} for a volume of shape {hu.shape}")
    return OutputRange(lo, hi, out, int_limits(out.dtype))


@torch.inference_mode()
def run_slabs(net, hu: np.ndarray, slab: int, device, *, hu_min: float | None = None,
              hu_max: float | None = None, dtype=torch.float32, batch: int = 4,
              out: np.ndarray | None = None, progress=None, desc: str = "protect") -> np.ndarray:
    """Stream the HU volume `hu` (z, y, x) through `net` slab by slab; the protected HU.

    net(x, starts) maps a batch x (B, slab, H, W) of slabs in normalised units ([-1, 1] by the
    training normalisation: min-max of the volume in float64, hu_min/hu_max defaulting to the
    volume's own) to protected slabs in the same units; `starts` are their first slices. The
    last slab is aligned to the end of the volume and wins its overlap. `out` (default a new
    float32 array) receives the result; an integer `out` gets rounded, clipped values.

    Inference mode: no autograd graph is kept (the in-place writes into `out` would otherwise
    chain every batch's graph: memory grew with the number of slices, and a tensor that requires
    grad cannot go back to NumPy from a GPU). `progress` is a tqdm-like callable or None."""
    device = torch.device(device)
    lo, hi, out, limits = output_range(hu, hu_min, hu_max, out)
    starts = slab_starts(hu.shape[0], slab)
    batch = max(1, int(batch))
    # The scan goes to the device once, in its own dtype (int16: 2 bytes a voxel over the bus);
    # on the CPU these are views of `hu` and `out`, no copies.
    src = hu if hu.dtype.isnative and hu.dtype.type in _TORCH_INPUT else hu.astype(np.float32)
    vol = torch.from_numpy(np.ascontiguousarray(src)).to(device)
    on_cpu = device.type == "cpu" and out.dtype.isnative and out.flags.c_contiguous
    res = torch.from_numpy(out) if on_cpu else torch.empty(out.shape, device=device,
                                                           dtype=_torch_dtype(out.dtype))
    it = range(0, len(starts), batch)
    if progress is not None:
        it = progress(it, desc=desc, leave=False, unit="batch")
    for i in it:
        chunk = starts[i:i + batch]
        x = torch.stack([vol[s:s + slab] for s in chunk])
        x = to_net(x.to(torch.float64), lo, hi).to(dtype)
        xp = to_hu(net(x, chunk).to(torch.float64), lo, hi)
        if limits is not None:  # as utils.stored.stored_as, on the device
            xp = xp.round().clamp(*limits)
        for j, s in enumerate(chunk):  # in order: the end-aligned last slab wins its overlap
            res[s:s + slab] = xp[j]
    if not on_cpu:
        out[...] = res.cpu().numpy()
    return out


def protect_hu(G: torch.nn.Module, hu: np.ndarray, cfg, device, *, hu_min: float | None = None,
               hu_max: float | None = None, dtype=torch.float32, seed: int = 0, batch: int = 4,
               out: np.ndarray | None = None, progress=None, desc: str = "protect",
               amp: str = "off", channels_last: bool = False) -> np.ndarray:
    """Protect the HU volume `hu` (z, y, x) with the MITS-GAN generator G (run_slabs: slab-wise,
    the training normalisation, result into `out`). The noise delta of each slab is slab_noise
    of (seed, first slice). Speed options: `batch` slabs per generator call; `amp`
    'bf16'/'fp16' autocast of G (its output is mapped to HU in float64); `channels_last`
    converts G (in place) and its inputs to NHWC."""
    check_generator_fits(G, cfg.slab, hu)
    G.eval()
    device = torch.device(device)
    lo, hi = value_range(hu, hu_min, hu_max)
    scale = _eps_scale(cfg, lo, hi)
    if channels_last:
        G.to(memory_format=torch.channels_last)

    def net(x, chunk):
        delta = slab_noise(seed, chunk, x.shape[1:], dtype, device)
        if channels_last:
            x, delta = (t.contiguous(memory_format=torch.channels_last) for t in (x, delta))
        with _autocast(device, amp):
            return G(x, delta, scale=scale)

    return run_slabs(net, hu, cfg.slab, device, hu_min=lo, hu_max=hi, dtype=dtype, batch=batch,
                     out=out, progress=progress, desc=desc)


def _torch_dtype(np_dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=np.dtype(np_dtype).newbyteorder("="))).dtype


def protect_volume(G: torch.nn.Module, item: VolumeItem, cfg, device, dtype=torch.float32,
                   seed: int = 0, batch: int = 8, progress=None, **speed) -> np.ndarray:
    """Protected volume in HU (float64), shape of the source. Noise delta is seeded.
    `speed`: protect_hu's amp / channels_last."""
    return protect_hu(G, item.scan.hu, cfg, device, hu_min=item.hu_min, hu_max=item.hu_max,
                      dtype=dtype, seed=seed, batch=batch,
                      out=np.empty(item.scan.hu.shape, dtype=np.float64), progress=progress,
                      desc=f"protect {Path(item.path).name}", **speed)


def load_generator(path, device="cpu"):
    """(G on `device` in eval mode, its Config, torch dtype) from a train.py checkpoint.

    A config that is not ours, or weights that do not fit the generator the config describes
    (another architecture or width), is a one-line ModelFileError."""
    path = Path(path)
    state = load_checkpoint(path)
    cfg = config_mod.checkpoint_config(state, path)
    dtype = torch_dtype(cfg.dtype)
    G = build_generator(cfg)
    weights = state["generator"]
    if not isinstance(weights, dict):
        raise ModelFileError(f"{path}: the generator entry is not a state dict")
    own = G.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    bad = [
        k
        for k in own
        if k in weights and tuple(getattr(weights[k], "shape", ())) != tuple(own[k].shape)
    ]
    if missing or extra or bad:
        what = (f"{len(missing)} missing, {len(extra)} unexpected, {len(bad)} of another shape"
                + (f" (e.g. {bad[0]}: {tuple(getattr(weights[bad[0]], 'shape', ()))} vs "
                   f"{tuple(own[bad[0]].shape)})" if bad else f" (e.g. {(missing or extra)[0]})"))
        raise ModelFileError(
            f"{path}: generator weights do not match a '{cfg.generator}' generator "
            f"with g_width={cfg.g_width}, slab={cfg.slab}: {what}"
        )
    G.load_state_dict(weights)
    G.to(device=device, dtype=dtype).eval()
    return G, cfg, dtype


def scan_with_hu(src: VolumeItem | Scan, hu: np.ndarray) -> Scan:
    """A Scan with the source's geometry and metadata holding `hu` (protected or tampered HU),
    stored as the source's integer type when it has one.

    `src` is a VolumeItem or a Scan. The result's source_path is None."""
    src = src.scan if isinstance(src, VolumeItem) else src
    if np.issubdtype(src.hu.dtype, np.integer) and hu.dtype != src.hu.dtype:
        hu = stored_as(hu, src.hu.dtype)
    return Scan(hu=hu, spacing=src.spacing.copy(), origin=src.origin.copy(),
                direction=src.direction.copy(), source_path=None,
                dicom_headers=src.dicom_headers)


def export_protected(item: VolumeItem, protected_hu: np.ndarray, out_dir) -> list[Path]:
    """Write <out_dir>/<name>.mhd (+ a DICOM series folder when the source was DICOM)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scan = scan_with_hu(item, protected_hu)
    name = scan_stem(item.path)
    written = [out_dir / f"{name}_protected.mhd"]
    save_mhd(scan, written[0])
    if item.scan.dicom_headers:
        written.append(out_dir / f"{name}_protected_dicom")
        save_dicom_series(scan, written[-1], series_description="MITS-GAN protected")
    return written
