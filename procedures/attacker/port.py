"""CT-GAN's attacker in PyTorch: the 3-D U-Net generator and a differentiable tamper core.

Two parts (docs/attack.md#pytorch-port):

1. `CTGANGeneratorTorch`: a layer-for-layer port of `procedures.ctgan.models.build_generator`
   (same layer names), in eval mode equal to Keras `training=False` (Dropout off, BatchNorm on
   its moving statistics with Keras' epsilon 1e-3). Weights come from a Keras model or straight
   from a `G_model.h5` with h5py (procedures.attacker.h5_weights), so a GPU machine needs no
   TensorFlow. Layout: Keras is channels-last
   (N, 32, 32, 32, 1), this module channels-first (N, 1, 32, 32, 32).

2. `DifferentiableTamper`: CT-GAN's inject/remove of one location (docs/attack.md#overview, steps
   1-7) as a torch graph, so that a protector can take the gradient of the tampered scan with
   respect to the scan it protects. Deviations from the published NumPy pipeline, all chosen
   for differentiability and all documented where they happen:
   - resampling goes to exactly 32^3 and back to the cut shape (docs/attack.md#exact-resampling: the
     published zoom cannot reach 32^3 for 5 mm slices; like attack_pipeline's
     exact_resample=True we always can). resample='trilinear' (default) uses F.interpolate
     with align_corners=True: the sample grid of `scipy.ndimage.zoom`, but linear instead of a
     cubic spline. resample='spline' is scipy's cubic-spline zoom (mode 'nearest') exactly:
     zoom is linear and separable, so it is three small matrices built once with scipy;
   - the > 2000 HU overflow fix averages every bad voxel's 5^3 neighbourhood of the *unfixed*
     cube at once (avg_pool3d); the published Python loop fixes voxels one by one, in place,
     so later means see earlier fixes;
   - step 8 (noise touch-ups: copied noise block, blend, max(blend, benign) for injection) is
     optional: `touchups="copy"` adds it (procedures.attacker.touchups, the code the Keras
     pipeline runs), `"none"` (the class default) stops at step 7. With it, `tampered` and
     `forward` need the whole scan: the noise block sits at a fixed place of it
     (docs/attack.md#touch-ups), and the gradient reaches the scan through that block too.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import scipy.ndimage
import torch
import torch.nn as nn
import torch.nn.functional as F

from procedures.attacker.touchups import (REF_SCALE, blend, inside_mask, kernel,
                                          noise_block_center, noise_from_block, overlay)
from utils.cubes import cube_bounds
from utils.equalizer import HistEqualizer
from utils.errors import CoordinateError, ModelFileError, UsageError
from utils.resample import scaled_shape

CUBE = 32
MASK_LIMS = (6, 26)           # in-painting region [6:26] on every axis (docs/attack.md#cube-geometry)
KERAS_BN_EPSILON = 1e-3       # Keras' BatchNormalization default
LEAKY_SLOPE = 0.2
OVERFLOW_HU = 2000.0          # docs/attack.md#overflow-fix
FLOOR_HU = -1000.0
CUT_PAD_HU = 0.0              # the attack pads out-of-volume voxels with 0 HU (section 2 step 1)

DOWN = ("g_d1", "g_d2", "g_d3", "g_d4", "g_d5")
UP = ("g_u3", "g_u4", "g_u5", "g_u6")
CONV_NAMES = tuple(f"{n}_conv" for n in DOWN + UP) + ("g_out",)
BN_NAMES = tuple(f"{n}_bn" for n in DOWN[1:] + UP)
ACTIONS = ("inject", "remove")
TOUCHUPS = ("none", "copy")


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------
def tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same' padding of one axis: total = max((ceil(n/s)-1)*s + k - n, 0), the odd
    voxel on the far side. k4 s2 on an even size -> (1, 1); k4 s1 -> (1, 2)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv3dSame(nn.Conv3d):
    """nn.Conv3d with Keras/TensorFlow 'same' padding (asymmetric for even kernels)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 4, stride: int = 1):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, bias=True)

    def forward(self, x):
        pads = []
        for ax in (4, 3, 2):  # F.pad lists the last axis first
            pads += tf_same_pads(x.shape[ax], self.kernel_size[ax - 2], self.stride[ax - 2])
        return super().forward(F.pad(x, pads))


def _keras_bn(ch: int) -> nn.BatchNorm3d:
    # Keras momentum 0.8 (moving = 0.8 * moving + 0.2 * batch) is torch momentum 0.2.
    return nn.BatchNorm3d(ch, eps=KERAS_BN_EPSILON, momentum=0.2)


class CTGANGeneratorTorch(nn.Module):
    """CT-GAN's U-Net generator (docs/ctgan-training.md#networks), channels-first: (N, 1, 32, 32, 32) -> same.

    Layer names equal the Keras model's (`g_d1_conv`, `g_d2_bn`, ..., `g_out`). Use eval mode:
    it is Keras `training=False` (what `generator.predict` runs).
    """

    def __init__(self, gf: int = 100):
        super().__init__()
        self.gf = int(gf)
        down_ch = (1, gf, 2 * gf, 4 * gf, 8 * gf, 8 * gf)
        for i, name in enumerate(DOWN):
            setattr(self, f"{name}_conv", Conv3dSame(down_ch[i], down_ch[i + 1], 4, 2))
            if i > 0:  # no BatchNorm on the first block
                setattr(self, f"{name}_bn", _keras_bn(down_ch[i + 1]))
        # Up block k: input channels = previous block's concat, output = filters, then concat skip.
        up_filters = (8 * gf, 4 * gf, 2 * gf, gf)
        skips = (8 * gf, 4 * gf, 2 * gf, gf)          # channels of d4, d3, d2, d1
        in_ch = 8 * gf                                 # d5
        for name, f, s in zip(UP, up_filters, skips):
            setattr(self, f"{name}_conv", Conv3dSame(in_ch, f, 4, 1))
            setattr(self, f"{name}_drop", nn.Dropout(0.5))
            setattr(self, f"{name}_bn", _keras_bn(f))
            in_ch = f + s
        self.g_out = Conv3dSame(in_ch, 1, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, name in enumerate(DOWN):
            x = F.leaky_relu(getattr(self, f"{name}_conv")(x), LEAKY_SLOPE)
            if i > 0:
                x = getattr(self, f"{name}_bn")(x)
            skips.append(x)
        x = skips.pop()  # d5
        for name in UP:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = F.relu(getattr(self, f"{name}_conv")(x))
            x = getattr(self, f"{name}_bn")(getattr(self, f"{name}_drop")(x))
            x = torch.cat([x, skips.pop()], dim=1)  # Keras Concatenate([x, skip]) on channels
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return torch.tanh(self.g_out(x))

    def forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """Keras layout in and out: (N, 32, 32, 32, 1)."""
        return self.forward(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)


# --- weight transfer ---------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Differentiable tamper
# --------------------------------------------------------------------------------------------
def torch_interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """np.interp(x, xp, fp) for non-decreasing xp, differentiable in x (and fp).

    Same values as NumPy: constant fp[0] / fp[-1] outside [xp[0], xp[-1]]; on repeated xp
    values (flat stretches of a cdf) the rightmost knot with xp[j] <= x is used, as NumPy's
    binary search does, so the slope (fp[j+1]-fp[j]) / (xp[j+1]-xp[j]) is always finite.
    """
    xp = xp.to(x.dtype)
    fp = fp.to(x.dtype)
    n = xp.numel()
    flat = x.reshape(-1)
    j = torch.searchsorted(xp, flat.detach().contiguous(), right=True) - 1
    j = j.clamp(0, n - 2)
    j1 = j + 1
    # index_select: ~50x faster than fancy indexing for 32^3 queries on CPU
    x0, x1, f0, f1 = xp.index_select(0, j), xp.index_select(0, j1), fp.index_select(0, j), fp.index_select(0, j1)
    den = x1 - x0
    safe = torch.where(den > 0, den, torch.ones_like(den))
    w = torch.where(den > 0, (flat - x0) / safe, torch.zeros_like(flat))
    y = f0 + w * (f1 - f0)
    y = torch.where(flat < xp[0], fp[0].expand_as(y), y)
    y = torch.where(flat >= xp[-1], fp[-1].expand_as(y), y)
    return y.reshape(x.shape)


@functools.lru_cache(maxsize=64)
def spline_zoom_matrix(n: int, m: int) -> np.ndarray:
    """(m, n) matrix of scipy.ndimage.zoom(order=3, mode='nearest') from n to m samples on one axis.

    zoom is linear and separable (spline prefilter and tensor-product B-spline weights per axis),
    so the 3-D zoom of utils.resample.resample_exact is these matrices applied axis by axis
    (checked to 1e-11 relative)."""
    if n == m:
        mat = np.eye(n)
    else:
        mat = np.stack([scipy.ndimage.zoom(e, m / n, mode="nearest") for e in np.eye(n)], axis=1)
        if mat.shape != (m, n):
            raise AssertionError(f"zoom {n}->{m} gave {mat.shape[0]} samples")
    mat.setflags(write=False)
    return mat


def _as_arrays(eq):
    """(centres, cdf) from a HistEqualizer, a (centres, cdf) pair or a path (.npz/.pkl)."""
    if isinstance(eq, (str, os.PathLike)):
        eq = HistEqualizer.load(eq)
    if hasattr(eq, "centres") and hasattr(eq, "cdf"):
        return np.asarray(eq.centres, np.float64), np.asarray(eq.cdf, np.float64)
    centres, cdf = eq
    return np.asarray(centres, np.float64), np.asarray(cdf, np.float64)


class DifferentiableTamper(nn.Module):
    """CT-GAN's tamper of one location (docs/attack.md#overview, steps 1-7) as a differentiable graph.

    Holds both generators (frozen by default, and always in eval mode: Keras training=False),
    their equalisers (`{inject,remove}_centres`, `_cdf`) and normalisations (`_norm` =
    [mean, min, max]) as float64 buffers. Pre/post-processing runs in `work_dtype` (float64, like
    the NumPy pipeline); the generator in its own dtype (float32, like Keras).

    clamp: 'plain' (torch.clamp: zero gradient where the generator output leaves [-0.5, 0.5];
    the default) or 'straight_through' (same values, identity gradient).
    resample: 'trilinear' (default) or 'spline' (= scipy's cubic zoom, see the module docstring).
    touchups: 'none' (steps 1-7, the default) or 'copy' (step 8 too, docs/attack.md#touch-ups).
    """

    def __init__(self, injector: nn.Module | None, remover: nn.Module | None,
                 inj_equalizer=None, rem_equalizer=None, inj_norm=None, rem_norm=None, *,
                 freeze_generators: bool = True, clamp: str = "plain",
                 resample: str = "trilinear", work_dtype: torch.dtype = torch.float64,
                 touchups: str = "none"):
        super().__init__()
        if clamp not in ("plain", "straight_through"):
            raise UsageError(f"clamp must be 'plain' or 'straight_through', not {clamp!r}")
        if resample not in ("trilinear", "spline"):
            raise UsageError(f"resample must be 'trilinear' or 'spline', not {resample!r}")
        if touchups not in TOUCHUPS:
            raise UsageError(f"touchups must be 'none' or 'copy', not {touchups!r}")
        self.touchups = touchups
        self._kernels: dict = {}
        self.clamp_mode = clamp
        self.resample_mode = resample
        self.work_dtype = work_dtype
        self.generators = nn.ModuleDict()
        for action, gen, eq, norm in (("inject", injector, inj_equalizer, inj_norm),
                                      ("remove", remover, rem_equalizer, rem_norm)):
            if gen is None:
                continue
            if eq is None or norm is None:
                raise UsageError(f"{action}: a generator needs its equaliser and normalisation")
            centres, cdf = _as_arrays(eq)
            norm = np.asarray(norm, np.float64).reshape(-1)
            if norm.shape != (3,) or not norm[2] > norm[1]:
                raise ModelFileError(f"{action}: normalisation must be [mean, min, max] with max > min")
            self.generators[action] = gen
            self.register_buffer(f"{action}_centres", torch.from_numpy(centres))
            self.register_buffer(f"{action}_cdf", torch.from_numpy(cdf))
            self.register_buffer(f"{action}_norm", torch.from_numpy(norm))
            if freeze_generators:
                gen.requires_grad_(False)
        if not len(self.generators):
            raise UsageError("DifferentiableTamper needs at least one generator")
        mask = torch.ones((CUBE,) * 3, dtype=torch.float64)
        lo, hi = MASK_LIMS
        mask[lo:hi, lo:hi, lo:hi] = 0.0
        self.register_buffer("keep_mask", mask)
        self.train(False)

    @classmethod
    def from_model_dirs(cls, inj_dir=None, rem_dir=None, device=None, **kw) -> "DifferentiableTamper":
        """From CT-GAN model folders: procedures.attacker.model_dir.load_differentiable."""
        # lazy: model_dir imports this module
        from procedures.attacker.model_dir import load_differentiable

        return load_differentiable(inj_dir, rem_dir, device=device, **kw)

    def train(self, mode: bool = True):
        """The attacker's generators stay in eval mode whatever the caller asks (frozen attacker)."""
        super().train(mode)
        for gen in self.generators.values():
            gen.eval()
        return self

    # --- cube level (1 mm, 32^3) ---------------------------------------------------------------
    def _action(self, action: str) -> str:
        if action not in self.generators:
            have = ", ".join(self.generators) or "none"
            raise UsageError(f"no {action!r} generator loaded (have: {have})")
        return action

    def equalize(self, hu, action):
        return torch_interp(hu, getattr(self, f"{action}_centres"), getattr(self, f"{action}_cdf"))

    def dequalize(self, v, action):
        return torch_interp(v, getattr(self, f"{action}_cdf"), getattr(self, f"{action}_centres"))

    def cube_forward(self, cube_hu: torch.Tensor, action: str) -> torch.Tensor:
        """Steps 3-6 on 1 mm cubes: (B, 32, 32, 32) HU -> tampered (B, 32, 32, 32) HU."""
        action = self._action(action)
        x = cube_hu.to(self.work_dtype)
        mean, lo, hi = getattr(self, f"{action}_norm").to(self.work_dtype)
        x = (self.equalize(x, action) - mean) / (hi - lo)
        x = x * self.keep_mask.to(x.dtype)             # step 4: in-painting region set to 0
        gen = self.generators[action]
        gdtype = next(gen.parameters()).dtype
        y = gen(x.to(gdtype).unsqueeze(1)).squeeze(1).to(self.work_dtype)
        y = self.clamp_output(y)
        y = self.dequalize(y * (hi - lo) + mean, action)
        return self.overflow_fix(y)

    def clamp_output(self, y: torch.Tensor) -> torch.Tensor:
        """Step 5's clip to [-0.5, 0.5]; 'straight_through' keeps the identity gradient."""
        if self.clamp_mode == "plain":
            return y.clamp(-0.5, 0.5)
        return y + (y.clamp(-0.5, 0.5) - y).detach()

    def resample(self, cubes: torch.Tensor, shape) -> torch.Tensor:
        """(B, d, h, w) -> (B, *shape) on the grid of scipy's zoom (corners to corners)."""
        shape = tuple(int(s) for s in shape)
        if tuple(cubes.shape[1:]) == shape:
            return cubes
        if self.resample_mode == "trilinear":
            return F.interpolate(cubes.unsqueeze(1), size=shape, mode="trilinear",
                                 align_corners=True).squeeze(1)
        mz, my, mx = (torch.tensor(spline_zoom_matrix(int(n), m), dtype=cubes.dtype, device=cubes.device)
                      for n, m in zip(cubes.shape[1:], shape))
        return torch.einsum("ai,bj,ck,nijk->nabc", mz, my, mx, cubes)

    @staticmethod
    def overflow_fix(hu: torch.Tensor) -> torch.Tensor:
        """Step 6: > 2000 HU -> mean of its 5^3 neighbourhood (-1000 padding); < -1000 -> -1000.

        All bad voxels are fixed from the unfixed cube at once (the published loop is sequential).
        """
        padded = F.pad(hu.unsqueeze(1), (2,) * 6, value=FLOOR_HU)
        local = F.avg_pool3d(padded, 5, stride=1).squeeze(1)
        hu = torch.where(hu > OVERFLOW_HU, local, hu)
        return hu.clamp(min=FLOOR_HU)

    # --- scan level ----------------------------------------------------------------------------
    @staticmethod
    def cut_shape(spacing) -> tuple[int, int, int]:
        """round(32 / spacing) voxels per axis (docs/attack.md#cube-geometry)."""
        sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
        if sp.shape != (3,) or not np.all(sp > 0):
            raise UsageError(f"spacing must be three positive numbers (z, y, x), got {spacing!r}")
        return tuple(int(v) for v in scaled_shape((CUBE,) * 3, 1.0 / sp))

    @staticmethod
    def _normalise_args(vol, center, action):
        single = vol.dim() == 3
        if not single and vol.dim() != 4:
            raise UsageError(f"volume must be (D, H, W) or (B, D, H, W), got {tuple(vol.shape)}")
        b = 1 if single else vol.shape[0]
        centers = np.asarray(center, dtype=np.float64)
        centers = np.broadcast_to(centers.reshape(-1, 3) if centers.ndim == 2 else centers, (b, 3))
        actions = [action] * b if isinstance(action, str) else list(action)
        if len(actions) != b:
            raise UsageError(f"{len(actions)} actions for a batch of {b}")
        return single, b, centers, actions

    def footprints(self, vol: torch.Tensor, spacing, center, action):
        """Tampered footprints: [(cube (d, h, w) part inside the volume, slices of the volume)].

        vol: (D, H, W) or (B, D, H, W) HU; center: (z, y, x) voxel or one per batch item;
        action: 'inject'/'remove' or one per item.
        """
        single, b, centers, actions = self._normalise_args(vol, center, action)
        v4 = vol.unsqueeze(0) if single else vol
        shape = self.cut_shape(spacing)
        cubes, geo = [], []
        for i in range(b):
            c = centers[i]
            if np.any(c < 0) or np.any(c >= np.asarray(v4.shape[1:])):
                raise CoordinateError(f"voxel {tuple(c.tolist())} is outside the scan {tuple(v4.shape[1:])}")
            start, _, a, e = cube_bounds(c, shape, v4.shape[1:])
            cubes.append(self.cut(v4[i], start, shape))  # step 1
            lo, hi = a - start, (start + np.asarray(shape)) - e
            geo.append((lo, np.asarray(shape) - hi, tuple(slice(int(p), int(q)) for p, q in zip(a, e))))
        cubes = self.resample(torch.stack(cubes), (CUBE,) * 3)  # step 2
        out = torch.empty_like(cubes)
        for act in sorted(set(actions)):  # one generator call per action
            idx = [i for i in range(b) if actions[i] == act]
            res = self.cube_forward(cubes[idx], act)
            out = out.index_copy(0, torch.tensor(idx, device=out.device), res)
        out = self.resample(out, shape)  # step 7: back to the cut shape
        result = []
        for i, (lo, hi, sl) in enumerate(geo):
            part = out[i, int(lo[0]):int(hi[0]), int(lo[1]):int(hi[1]), int(lo[2]):int(hi[2])]
            result.append((part.to(vol.dtype), sl))
        return result

    def cut(self, v3: torch.Tensor, start, shape) -> torch.Tensor:
        """The block of `shape` at `start` of a (D, H, W) tensor in work dtype, differentiable;
        voxels outside the scan are 0 HU, as the attack pads (docs/attack.md#border-cubes)."""
        start = np.asarray(start, dtype=np.int64)
        stop = start + np.broadcast_to(np.asarray(shape, dtype=np.int64), (3,))
        dims = np.asarray(v3.shape)
        a, e = np.clip(start, 0, dims), np.clip(stop, 0, dims)
        region = v3[int(a[0]):int(e[0]), int(a[1]):int(e[1]), int(a[2]):int(e[2])]
        lo, hi = a - start, stop - e
        pads = [int(lo[2]), int(hi[2]), int(lo[1]), int(hi[1]), int(lo[0]), int(hi[0])]
        return F.pad(region.to(self.work_dtype), pads, value=CUT_PAD_HU)

    @staticmethod
    def ref_side(spacing) -> int:
        """The reference (touch-up) cube's side: int(max(cut) * 1.3) voxels on every axis."""
        return int(max(DifferentiableTamper.cut_shape(spacing)) * REF_SCALE)

    def touch_up(self, ben_ext, mal_ext, noise_block, ref_start, nb_start, vol_shape, action, *,
                 pad: float = CUT_PAD_HU):
        """Step 8 on cut blocks (sdim^3, work dtype): the final reference block.

        ben_ext: the benign reference block; mal_ext: the same with the tampered cube pasted;
        noise_block: the copy-noise block of the scan before the paste (the pasted voxels it
        shares with mal_ext are taken from there). Voxels outside the scan are padding in both
        blocks, as CT-GAN's re-cut after the paste gives (procedures.attacker.touchups)."""
        sdim = int(ben_ext.shape[0])
        inside = inside_mask(ref_start, sdim, vol_shape, ben_ext.device)
        mal_ext = torch.where(inside, mal_ext, torch.full_like(mal_ext, pad))
        noise = noise_from_block(overlay(noise_block, nb_start, mal_ext, ref_start, vol_shape))
        key = (sdim, action, ben_ext.dtype, ben_ext.device)
        if key not in self._kernels:
            self._kernels[key] = torch.as_tensor(kernel(sdim, action).copy(), dtype=ben_ext.dtype,
                                                 device=ben_ext.device)
        return blend(mal_ext, ben_ext, noise, self._kernels[key], action)

    def tampered(self, vol: torch.Tensor, spacing, center, action, region: str = "cube",
                 frame=None):
        """The attack's result, steps 1-8 with touchups 'copy' (1-7 with 'none'), as
        [(values, slices of `vol`)] per batch item: region 'cube' is the 32 mm cut (where the
        evaluation measures disruption), 'reference' everything the attack changes (the
        reference cube with 'copy', the cut with 'none'). Differentiable in `vol`.

        With 'copy' the copy-noise block's place depends on the whole scan's shape: `vol` is the
        whole scan, or with frame=(origin, scan shape) a window of it starting at voxel `origin`
        that holds every reference cube and the copy-noise block where they lie inside the scan
        (`window`); centres are then in scan coordinates. A window keeps the graph (and the
        backward pass) to the voxels the attack reads."""
        single, b, centers, actions = self._normalise_args(vol, center, action)
        v4 = vol.unsqueeze(0) if single else vol
        origin = np.zeros(3, np.int64) if frame is None else np.asarray(frame[0], np.int64)
        dims = tuple(int(n) for n in (v4.shape[1:] if frame is None else frame[1]))
        feet = self.footprints(vol, spacing, centers - origin, actions)
        if self.touchups == "none":
            return feet
        sdim = self.ref_side(spacing)
        nb_start = cube_bounds(noise_block_center(dims), (sdim,) * 3, dims)[0]
        out = []
        for i, (part, sl) in enumerate(feet):
            ref_start, _, a, e = cube_bounds(centers[i], (sdim,) * 3, dims)
            ref_local = ref_start - origin
            local = tuple(slice(s.start - int(r), s.stop - int(r)) for s, r in zip(sl, ref_local))
            if any(q.start < 0 or q.stop > sdim for q in local):
                raise UsageError(f"spacing {tuple(spacing)}: the cube is not inside the "
                                 f"reference cube")
            ben = self.cut(v4[i], ref_local, sdim)
            mal = ben.clone()
            mal[local] = part.to(self.work_dtype)
            final = self.touch_up(ben, mal, self.cut(v4[i], nb_start - origin, sdim), ref_start,
                                  nb_start, dims, actions[i])
            if region == "cube":
                out.append((final[local].to(vol.dtype), sl))
            else:
                inner = tuple(slice(int(p - r), int(q - r)) for p, q, r in zip(a, e, ref_start))
                out.append((final[inner].to(vol.dtype),
                            tuple(slice(int(p - o), int(q - o)) for p, q, o in zip(a, e, origin))))
        return out

    def window(self, spacing, centers, dims) -> tuple[slice, slice, slice]:
        """The smallest box of a scan of shape `dims` holding, where they lie inside it, the
        reference cubes at `centers` and the copy-noise block: what `tampered` reads with
        touchups 'copy' (with 'none': the cuts). Pass vol[box] and frame=(box starts, dims)."""
        dims = np.asarray(dims, np.int64)
        if self.touchups == "none":
            shape = np.asarray(self.cut_shape(spacing))
            blocks = [cube_bounds(c, shape, dims)[:2] for c in np.asarray(centers).reshape(-1, 3)]
        else:
            side = np.full(3, self.ref_side(spacing))
            blocks = [cube_bounds(c, side, dims)[:2] for c in np.asarray(centers).reshape(-1, 3)]
            blocks.append(cube_bounds(noise_block_center(dims), side, dims)[:2])
        lo = np.clip(np.min([b[0] for b in blocks], 0), 0, dims)
        hi = np.clip(np.max([b[1] for b in blocks], 0), 0, dims)
        return tuple(slice(int(p), int(q)) for p, q in zip(lo, hi))

    def forward(self, vol: torch.Tensor, spacing, center, action) -> torch.Tensor:
        """The tampered volume (same shape and dtype as `vol`), differentiable in `vol`.

        The paste writes into a clone (never in place on the caller's tensor or a leaf), so the
        gradient is the identity outside the footprint and flows through the generator inside.
        """
        single = vol.dim() == 3
        feet = self.tampered(vol, spacing, center, action, region="reference")
        out = vol.clone()
        if single:
            out[feet[0][1]] = feet[0][0]
        else:
            for i, (part, sl) in enumerate(feet):
                out[(i,) + sl] = part
        return out

    @torch.no_grad()
    def tamper_volume(self, vol, spacing, coord_vox, action="inject", rng=None):
        """The Attacker interface (procedures.attacker.interface): the attack (steps 1-8 with
        touchups 'copy', 1-7 with 'none') pasted into the float HU volume `vol` (NumPy or
        torch) in place; the slices it changed. The copy-noise is taken from the scan itself,
        so `rng` is not used."""
        vt = torch.as_tensor(vol)
        part, sl = self.tampered(vt.to(self.keep_mask.device), spacing, coord_vox, action,
                                 region="reference")[0]
        vt[sl] = part.to(vt.device, vt.dtype)
        return sl
