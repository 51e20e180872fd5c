"""Protect whole volumes with a trained MITS-GAN generator and export them in HU.

A volume is processed in slabs of `slab` consecutive slices; the last slab is aligned to the
end of the volume so that every slice is protected (the published loop never uses the last
depth % 4 slices). Protection streams: only one batch of slabs is normalised and run at a time,
and protected HU are written straight into the output array (int16 for int16 scans), so a
512x512x400 scan needs about its own size twice plus one batch of activations.
The noise delta of each slab is drawn from (seed, first slice), so the protected scan does not
depend on the batch size or the device. Exported scans keep the source geometry and, for DICOM
sources, metadata.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scanDataset import VolumeItem, to_hu
from utils.errors import ModelFileError, UsageError
from utils.scan_io import Scan


def slab_starts(depth: int, slab: int) -> list[int]:
    """Start index of every slab covering [0, depth); the last one ends at depth."""
    if depth < slab:
        raise ValueError(f"volume has {depth} slices, fewer than a slab of {slab}")
    starts = list(range(0, depth - slab + 1, slab))
    if starts[-1] + slab < depth:
        starts.append(depth - slab)
    return starts


def _eps_scale(cfg, hu_min: float, hu_max: float) -> float | None:
    if cfg.eps_hu <= 0:
        return None
    return 2.0 * cfg.eps_hu / max(hu_max - hu_min, 1.0)


def eps_scale(cfg, item: VolumeItem) -> float | None:
    """The perturbation bound in normalised units (None = unbounded)."""
    return _eps_scale(cfg, item.hu_min, item.hu_max)


def slab_delta(seed: int, start: int, shape, dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) noise delta for the slab that starts at slice `start` (seeded by both)."""
    s = int(np.random.SeedSequence([int(seed), int(start)]).generate_state(1, np.uint64)[0] % 2**63)
    return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(s), dtype=dtype)


@torch.no_grad()
def protect_hu(G: torch.nn.Module, hu: np.ndarray, cfg, device, *, hu_min: float | None = None,
               hu_max: float | None = None, dtype=torch.float32, seed: int = 0, batch: int = 4,
               out: np.ndarray | None = None, progress=None, desc: str = "protect") -> np.ndarray:
    """Protect the HU volume `hu` (z, y, x) slab by slab and return the protected HU.

    Normalisation is the training one (ScanDataset: min-max of the whole volume to [-1, 1],
    float64 arithmetic), with hu_min/hu_max defaulting to the volume's own. `out` (default: a
    new float32 array) receives the result; an integer `out` gets rounded, clipped values.
    `progress` is a tqdm-like callable or None."""
    G.eval()
    depth = hu.shape[0]
    lo = float(hu.min()) if hu_min is None else float(hu_min)
    hi = float(hu.max()) if hu_max is None else float(hu_max)
    span = hi - lo if hi > lo else 1.0
    if out is None:
        out = np.empty(hu.shape, dtype=np.float32)
    if out.shape != hu.shape:
        raise ValueError(f"output of shape {out.shape} for a volume of shape {hu.shape}")
    info = np.iinfo(out.dtype) if np.issubdtype(out.dtype, np.integer) else None
    scale = _eps_scale(cfg, lo, hi)
    starts = slab_starts(depth, cfg.slab)
    batch = max(1, int(batch))
    it = range(0, len(starts), batch)
    if progress is not None:
        it = progress(it, desc=desc, leave=False, unit="batch")
    for i in it:
        chunk = starts[i:i + batch]
        x = np.stack([hu[s:s + cfg.slab] for s in chunk]).astype(np.float64)
        x = torch.from_numpy((x - lo) / span * 2.0 - 1.0).to(device=device, dtype=dtype)
        delta = torch.stack([slab_delta(seed, s, x.shape[1:], dtype) for s in chunk]).to(device)
        xp = G(x, delta, scale=scale).double().cpu().numpy()
        xp = to_hu(xp, lo, hi)
        if info is not None:
            xp = np.clip(np.rint(xp), info.min, info.max)
        for j, s in enumerate(chunk):
            out[s:s + cfg.slab] = xp[j]
    return out


def protect_volume(G: torch.nn.Module, item: VolumeItem, cfg, device, dtype=torch.float32,
                   seed: int = 0, batch: int = 8, progress=None) -> np.ndarray:
    """Protected volume in HU (float64), shape of the source. Noise delta is seeded."""
    return protect_hu(G, item.scan.hu, cfg, device, hu_min=item.hu_min, hu_max=item.hu_max,
                      dtype=dtype, seed=seed, batch=batch,
                      out=np.empty(item.scan.hu.shape, dtype=np.float64), progress=progress,
                      desc=f"protect {Path(item.path).name}")


def load_generator(path, device="cpu"):
    """(G on `device` in eval mode, its Config, torch dtype) from a train.py checkpoint.

    A config that is not ours, or weights that do not fit the generator the config describes
    (another architecture or width), is a one-line ModelFileError."""
    import config as config_mod
    from generator import build_generator
    from utils.checkpoint import load_checkpoint

    path = Path(path)
    state = load_checkpoint(path)
    try:
        cfg = config_mod.load_config_dict(dict(state["config"]))
    except (UsageError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: checkpoint config is not a MITS-GAN config ({e})") from None
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    G = build_generator(cfg)
    weights = state["generator"]
    if not isinstance(weights, dict):
        raise ModelFileError(f"{path}: the generator entry is not a state dict")
    own = G.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    bad = [k for k in own if k in weights and tuple(getattr(weights[k], "shape", ())) != tuple(own[k].shape)]
    if missing or extra or bad:
        what = (f"{len(missing)} missing, {len(extra)} unexpected, {len(bad)} of another shape"
                + (f" (e.g. {bad[0]}: {tuple(getattr(weights[bad[0]], 'shape', ()))} vs "
                   f"{tuple(own[bad[0]].shape)})" if bad else f" (e.g. {(missing or extra)[0]})"))
        raise ModelFileError(f"{path}: generator weights do not match a '{cfg.generator}' generator "
                             f"with g_width={cfg.g_width}, slab={cfg.slab}: {what}")
    G.load_state_dict(weights)
    G.to(device=device, dtype=dtype).eval()
    return G, cfg, dtype


def protected_scan(src: VolumeItem | Scan, protected_hu: np.ndarray) -> Scan:
    """A Scan with the source geometry/metadata and the given HU (int16 when the source is).

    `src` is a VolumeItem or a Scan. The result's source_path is None."""
    src = src.scan if isinstance(src, VolumeItem) else src
    hu = protected_hu
    if np.issubdtype(src.hu.dtype, np.integer) and hu.dtype != src.hu.dtype:
        info = np.iinfo(src.hu.dtype)
        hu = np.clip(np.rint(hu), info.min, info.max).astype(src.hu.dtype)
    return Scan(hu=hu, spacing=src.spacing.copy(), origin=src.origin.copy(),
                direction=src.direction.copy(), source_path=None,
                dicom_headers=src.dicom_headers)


def scan_stem(path) -> str:
    """A scan's name without its format suffix (a DICOM folder's name as it is)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".mhd", ".mha", ".nrrd", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def export_protected(item: VolumeItem, protected_hu: np.ndarray, out_dir) -> list[Path]:
    """Write <out_dir>/<name>.mhd (+ a DICOM series folder when the source was DICOM)."""
    from utils.scan_io import save_dicom_series, save_mhd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scan = protected_scan(item, protected_hu)
    name = scan_stem(item.path)
    written = [out_dir / f"{name}_protected.mhd"]
    save_mhd(scan, written[0])
    if item.scan.dicom_headers:
        written.append(out_dir / f"{name}_protected_dicom")
        save_dicom_series(scan, written[-1], series_description="MITS-GAN protected")
    return written
