"""CT-GAN's scan manipulator in PyTorch, on the device: the black-box attacker without NumPy/SciPy.

`TorchScanManipulator` computes what procedures.attacker.pipeline.ScanManipulator computes with
its default (non-published) settings (docs/attack.md#overview, steps 1-8):
cut the cube and the reference cube, resample to 32^3 with SciPy's cubic-spline zoom,
equalise, normalise, mask, run the generator, clip, de-normalise, de-equalise, fix overflow,
resample back, paste, and the copy-noise touch-ups. Steps 1-8 are
procedures.attacker.port.DifferentiableTamper (spline resampling as three small matrices, np.interp
as torch_interp, plain clip, float64 work like the NumPy pipeline; its generator is the
layer-for-layer PyTorch port in float32, like Keras; docs/attack.md#pytorch-port); step 8
(docs/attack.md#touch-ups) is procedures.attacker.touchups, shared with the NumPy pipeline.

Only the two blocks a tamper reads (the reference cube and the copy-noise block) go to the
device and only the reference cube comes back: on a GPU a tamper moves ~3 x sdim^3 values
over the bus (sdim = 72 at 0.57 mm in-plane), and no TensorFlow or Keras is needed.

Equal to the Keras pipeline within a few HU where the generator output sits on a steep part of
the de-equalisation (float32 generators computed in another order); tests/test_attack_torch.py
states the tolerance. Not supported (use ScanManipulator): the published preset's behaviour
(border failures, a missing model leaving the scan unchanged) and the Gaussian-noise touch-up.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from procedures.attacker.model_dir import SUBDIR, load_differentiable
from procedures.attacker.pipeline import (CUBE, REF_SCALE, AttackShapeError, ScanManipulator,
                                          _check_action, check_coord, check_cube_fits,
                                          published_shape_error)
from procedures.attacker.port import DifferentiableTamper
from procedures.attacker.touchups import noise_block_center
from utils.cubes import cube_bounds
from utils.device import pick_device
from utils.errors import ScanFormatError, UsageError
from utils.resample import scaled_shape


def load_tamper_core(folder, action: str, device) -> DifferentiableTamper:
    """One CT-GAN model folder as a DifferentiableTamper for `action` on `device`, with the
    NumPy pipeline's arithmetic (spline resampling, plain clip, float64 work)."""
    folder = Path(folder)
    dirs = (folder, None) if action == "inject" else (None, folder)
    return load_differentiable(*dirs, device=device, resample="spline", clamp="plain",
                               work_dtype=torch.float64)


class TorchScanManipulator(ScanManipulator):
    """ScanManipulator (copy-noise touch-ups, not the published preset) computed in torch on
    `device`. tamper_volume takes a float NumPy volume (blocks go to the device) or a float
    torch tensor (on any device; it stays there)."""

    def __init__(self, model_dir="models", *, device="cpu", exact_resample: bool = True,
                 cut_pad_value: float = 0.0, seed: int | None = None):
        super().__init__(model_dir, exact_resample=exact_resample, noise="copy",
                         cut_pad_value=cut_pad_value, seed=seed, published=False)
        self.device = torch.device(device)

    def model(self, action: str) -> DifferentiableTamper:
        _check_action(action)
        if action not in self._models:
            self._models[action] = load_tamper_core(
                self.model_dir / SUBDIR[action], action, self.device
            )
        return self._models[action]

    @torch.inference_mode()
    def tamper_volume(self, vol, spacing, coord_vox, action: str = "inject", rng=None):
        """Tamper float HU volume `vol` (z, y, x) IN PLACE at voxel `coord_vox`; returns the
        bounding slices of what changed (the reference-cube footprint), as ScanManipulator."""
        t0 = time.perf_counter()
        _check_action(action)
        center = check_coord(coord_vox, vol.shape)
        spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
        if not np.all(spacing > 0):
            raise ScanFormatError(f"invalid voxel spacing {spacing.tolist()} mm")
        check_cube_fits(tuple(vol.shape), spacing)
        is_float = (
            vol.dtype.is_floating_point
            if isinstance(vol, torch.Tensor)
            else np.issubdtype(vol.dtype, np.floating)
        )
        if not is_float:  # pasting blends into ints would truncate
            raise UsageError(f"tamper_volume needs a float HU volume, got {vol.dtype}")
        core = self.model(action)
        cube_shape = scaled_shape(CUBE, 1.0 / spacing)
        if np.any(cube_shape < 1):
            raise AttackShapeError(
                f"voxel spacing {spacing.tolist()} mm is too coarse for a 32 mm cube"
            )
        if not self.exact_resample and published_shape_error(spacing):
            raise AttackShapeError(published_shape_error(spacing))
        sdim = int(np.max(cube_shape) * REF_SCALE)
        ref_start = cube_bounds(center, (sdim,) * 3, vol.shape)[0]
        cube_start = cube_bounds(center, cube_shape, vol.shape)[0]
        if np.any(cube_start < ref_start) or np.any(cube_start + cube_shape > ref_start + sdim):
            raise AttackShapeError(
                f"voxel spacing {spacing.tolist()} mm: the cube is not inside the "
                f"reference cube; use procedures.attacker.pipeline.ScanManipulator"
            )
        ben_ext = self._cut(vol, ref_start, sdim)
        # steps 1-7 on the reference block (it holds the whole cube, padded where the scan ends)
        part, sl = core.footprints(ben_ext, spacing, center - ref_start, action)[0]
        mal_ext = ben_ext.clone()
        mal_ext[sl] = part
        # step 8, the differentiable attack's own (procedures.attacker.touchups)
        nb_start = cube_bounds(noise_block_center(vol.shape), (sdim,) * 3, vol.shape)[0]
        final = core.touch_up(ben_ext, mal_ext, self._cut(vol, nb_start, sdim), ref_start, nb_start,
                              tuple(vol.shape), action, pad=self.cut_pad_value)
        changed = self._paste(vol, final, ref_start)
        self.last_scan_shape = tuple(int(n) for n in vol.shape)  # padded borders: never grows
        self.timings.append(time.perf_counter() - t0)
        return changed

    # --- blocks of the volume on the device ------------------------------------------------------
    def _cut(self, vol, start, side: int) -> torch.Tensor:
        """float64 block of `side`^3 at `start` on the device; outside the scan: cut_pad_value."""
        out = torch.full((side,) * 3, self.cut_pad_value, dtype=torch.float64, device=self.device)
        a, b = np.clip(start, 0, vol.shape), np.clip(start + side, 0, vol.shape)
        if np.all(b > a):
            src = vol[a[0]:b[0], a[1]:b[1], a[2]:b[2]]
            src = torch.as_tensor(np.ascontiguousarray(src)) if isinstance(src, np.ndarray) else src
            out[tuple(slice(int(p - s), int(q - s)) for p, q, s in zip(a, b, start))] = src.to(
                self.device, torch.float64
            )
        return out

    def _paste(self, vol, block: torch.Tensor, start):
        """Write the part of `block` inside the scan into `vol`; its slices in `vol`."""
        a = np.clip(start, 0, vol.shape)
        b = np.maximum(a, np.clip(start + block.shape[0], 0, vol.shape))
        dst = tuple(slice(int(p), int(q)) for p, q in zip(a, b))
        if np.all(b > a):
            part = block[tuple(slice(int(p - s), int(q - s)) for p, q, s in zip(a, b, start))]
            if isinstance(vol, torch.Tensor):
                vol[dst] = part.to(vol.device, vol.dtype)
            else:
                vol[dst] = part.cpu().numpy().astype(vol.dtype, copy=False)
        return dst


def attacker_impl(cfg) -> str:
    """'keras' or 'torch' for a config's `attacker_impl` ('auto': torch on a GPU, where the
    Keras pipeline's NumPy/SciPy work bound training, keras on the CPU; docs/performance.md)."""
    if cfg.attacker_impl != "auto":
        return cfg.attacker_impl
    return "torch" if pick_device(cfg.device).type == "cuda" else "keras"


def blackbox_attacker(cfg) -> ScanManipulator:
    """The black-box training attacker of a config: ScanManipulator (Keras; it also has the
    published border and missing-model behaviours) or TorchScanManipulator on the device."""
    if attacker_impl(cfg) == "torch":
        if cfg.attack_borders != "pad" or cfg.missing_model != "error":
            raise UsageError(
                "--attacker_impl torch has only --attack_borders pad and --missing_model "
                "error (the published behaviours are Keras'); use --attacker_impl keras"
            )
        return TorchScanManipulator(cfg.models_dir, device=pick_device(cfg.device),
                                    exact_resample=cfg.exact_resample)
    return ScanManipulator(cfg.models_dir, backend=cfg.keras_backend or None,
                           exact_resample=cfg.exact_resample, borders=cfg.attack_borders,
                           missing_model=cfg.missing_model)
