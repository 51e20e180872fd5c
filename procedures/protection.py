"""Protect whole volumes with a trained MITS-GAN generator and export them in HU.

A volume is processed in slabs of `slab` consecutive slices; the last slab is aligned to the
end of the volume so that every slice is protected (the published loop never uses the last
depth % 4 slices). Exported scans keep the source geometry and, for DICOM sources, metadata.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scanDataset import VolumeItem, to_hu
from utils.scan_io import Scan


def slab_starts(depth: int, slab: int) -> list[int]:
    """Start index of every slab covering [0, depth); the last one ends at depth."""
    if depth < slab:
        raise ValueError(f"volume has {depth} slices, fewer than a slab of {slab}")
    starts = list(range(0, depth - slab + 1, slab))
    if starts[-1] + slab < depth:
        starts.append(depth - slab)
    return starts


def eps_scale(cfg, item: VolumeItem) -> float | None:
    """The perturbation bound in normalised units (None = unbounded)."""
    if cfg.eps_hu <= 0:
        return None
    return 2.0 * cfg.eps_hu / max(item.hu_max - item.hu_min, 1.0)


@torch.no_grad()
def protect_volume(G: torch.nn.Module, item: VolumeItem, cfg, device, dtype=torch.float32,
                   seed: int = 0, batch: int = 8, progress=None) -> np.ndarray:
    """Protected volume in HU (float64), shape of the source. Noise delta is seeded."""
    G.eval()
    vol = item.volume
    depth = vol.shape[0]
    out = torch.empty(vol.shape, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    starts = slab_starts(depth, cfg.slab)
    scale = eps_scale(cfg, item)
    it = range(0, len(starts), batch)
    if progress is not None:
        it = progress(it, desc=f"protect {Path(item.path).name}", leave=False)
    for i in it:
        chunk = starts[i:i + batch]
        x = torch.stack([vol[s:s + cfg.slab] for s in chunk]).to(device=device, dtype=dtype)
        delta = torch.rand(x.shape, generator=gen, dtype=dtype).to(device)
        xp = G(x, delta, scale=scale).double().cpu()
        for j, s in enumerate(chunk):
            out[s:s + cfg.slab] = xp[j]
    return to_hu(out.numpy(), item.hu_min, item.hu_max)


def protected_scan(item: VolumeItem, protected_hu: np.ndarray) -> Scan:
    """A Scan with the source geometry/metadata and the protected HU (int16 when the source is)."""
    src = item.scan
    hu = protected_hu
    if np.issubdtype(src.hu.dtype, np.integer):
        info = np.iinfo(src.hu.dtype)
        hu = np.clip(np.rint(hu), info.min, info.max).astype(src.hu.dtype)
    return Scan(hu=hu, spacing=src.spacing.copy(), origin=src.origin.copy(),
                direction=src.direction.copy(), source_path=None,
                dicom_headers=src.dicom_headers)


def export_protected(item: VolumeItem, protected_hu: np.ndarray, out_dir) -> list[Path]:
    """Write <out_dir>/<name>.mhd (+ a DICOM series folder when the source was DICOM)."""
    from utils.scan_io import save_dicom_series, save_mhd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scan = protected_scan(item, protected_hu)
    name = Path(item.path).name
    for suffix in (".nii.gz", ".mhd", ".mha", ".nrrd", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    written = [out_dir / f"{name}_protected.mhd"]
    save_mhd(scan, written[0])
    if item.scan.dicom_headers:
        written.append(out_dir / f"{name}_protected_dicom")
        save_dicom_series(scan, written[-1], series_description="MITS-GAN protected")
    return written
