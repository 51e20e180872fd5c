"""CT-GAN's scan manipulator: inject or remove a lung nodule at one location (docs/attack.md).

Follows the arithmetic of CT-GAN's procedures/attacker/pipeline.py (Mirsky et al. 2019), which
MITS-GAN uses unchanged as its frozen attacker, with these deliberate differences
(docs/fidelity.md lists each with its measured effect):
- `exact_resample=True` (default) zooms the cut cube to exactly 32^3 and back to exactly its
  cut shape, so 5 mm scans work; `exact_resample=False` is the published zoom, which cannot
  reach 32^3 for some slice spacings: we raise AttackShapeError where it crashed.
- The >2000 HU overflow fix is vectorised (one uniform filter over the original values); the
  published loop updated voxels one by one, so a bad voxel's mean could include a neighbour
  that was already fixed. Identical whenever no two bad voxels are within 2 voxels.
- The published code draws a 150x200x300 `randn` (inject) / 150x200x200 (remove) on every
  tamper and uses it only in the Gaussian-noise mode; we draw noise only in that mode, only as
  large as needed, from a caller's np.random.Generator (reproducible).
- The published Gaussian-noise mode cannot run (it slices with the cube's shape tuple); ours
  is the evident intent: N(0, sd) noise zoomed by rf = 1.3 * 60 / std(lung HU), cropped.
- Cubes that cross the scan's border are padded with 0 HU (`borders="pad"`). With
  `borders="published"` the published cut and paste are reproduced (docs/attack.md#border-cubes):
  a touch-up cut that needs padding fails (AttackBorderError), and the paste of a non-cubic
  cube that seems to cross the border grows the scan at its end; the touch-ups then run on the
  grown scan. The caller's volume keeps its shape: it receives the grown scan's first slices,
  which is all MITS-GAN reads back.
- A missing model is an error (ModelFileError) unless `missing_model="unchanged"`, which, like
  the published code, prints a message and leaves the scan unchanged.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import scipy.ndimage

from procedures.attacker.keras_env import get_keras
from procedures.attacker.model_dir import SUBDIR, load_keras_model, model_files
from procedures.attacker.touchups import (KERNEL_SIGMA, REF_SCALE, blend,  # noqa: F401 (re-export)
                                          kern01, noise_block_center, noise_from_block)
from utils.cubes import cube_bounds, cut_cube, paste_cube
from utils.equalizer import HistEqualizer
from utils.errors import CoordinateError, MitsError, ModelFileError, ScanFormatError, UsageError
from utils.resample import resample_exact, scale_published, scaled_shape
from utils.scan import check_coord, check_min_size

CUBE = np.array([32, 32, 32])             # z, y, x voxels at 1 mm
MASK = (slice(6, 26),) * 3                # in-painting region, config mask_{z,y,x}lims
ACTIONS = ("inject", "remove")
NOISE_MODES = ("copy", "gaussian")
BORDERS = ("pad", "published")
MISSING_MODEL = ("error", "unchanged")


class AttackShapeError(MitsError):
    """The published attack cannot tamper here: its zoom cannot bring the cube to 32^3
    (e.g. 5 mm slices), or (AttackBorderError) a touch-up cube leaves the scan.

    A property of the scan, not of the user's input: exit code of ScanFormatError."""

    exit_code = 4


class AttackBorderError(AttackShapeError):
    """borders="published" only: the reference cube or the copy-noise block leaves the scan
    (after any growth by the paste).

    The published touch-up cuts pass the cube shape as a tuple, and its cutCube pads with
    `shape * 2`, which for a tuple repeats it: NumPy raises ValueError whenever padding is
    needed (its test is centre - round(side / 2) < 0 or centre + round(side / 2) + 1 > size)."""


# --------------------------------------------------------------------------------------------
# small numeric helpers (CT-GAN utils.utils)
# --------------------------------------------------------------------------------------------
def fix_overflow(cube: np.ndarray) -> np.ndarray:
    """Overflow fix (docs/attack.md#overflow-fix): voxels > 2000 HU -> mean of their 5x5x5
    neighbourhood (outside = -1000), then everything < -1000 -> -1000. New float64 array."""
    cube = np.asarray(cube, dtype=np.float64)
    bad = cube > 2000
    if bad.any():
        means = scipy.ndimage.uniform_filter(cube, size=5, mode="constant", cval=-1000.0)
        cube = np.where(bad, means, cube)
    else:
        cube = cube.copy()
    cube[cube < -1000] = -1000
    return cube


def _fmt(v: float) -> str:
    return repr(float(v))


def check_cube_fits(shape, spacing, path="the scan") -> None:
    """CT-GAN cuts a 32 mm cube (CUBE voxels at 1 mm) around the location and pads what lies
    outside the scan: a scan thinner than that cube along any axis (2 slices, 1 x 1 pixels)
    would be tampered mostly in padding, so it is refused (docs/safety.md#what-a-scan-may-be)."""
    cut = scaled_shape(CUBE, 1.0 / np.asarray(spacing, dtype=np.float64).reshape(3))
    check_min_size(shape, cut, path, "CT-GAN's tamper", "its 32 mm cube must fit inside the scan")


def published_shape_error(spacing) -> str | None:
    """Message when CT-GAN's zoom cannot give 32^3 at this spacing, else None: round(32 / s)
    slices zoomed by round(n * s) / n give 30 slices at 5 mm (docs/fidelity.md)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    cut = scaled_shape(CUBE, 1.0 / spacing)
    got = scaled_shape(cut, spacing)
    for ax in range(3):
        if got[ax] != CUBE[ax]:
            s = spacing[ax]
            what = "slices" if ax == 0 else f"pixels (axis {'zyx'[ax]})"
            return (
                f"round(round(32/{_fmt(s)})*{_fmt(s)})={got[ax]} != 32: the published attack cannot "
                f"tamper {_fmt(s)} mm {what}; use exact resampling or data/z2.5"
            )
    return None


# --------------------------------------------------------------------------------------------
# one frozen generator with its preprocessing files
# --------------------------------------------------------------------------------------------
_SHARED: "weakref.WeakValueDictionary[tuple, CTGANModel]" = weakref.WeakValueDictionary()


class CTGANModel:
    """One CT-GAN model folder: generator .h5, normalization.npy, equaliser (.npz or legacy .pkl).

    With `missing_ok=True` (missing_model="unchanged", as published) a missing folder/file leaves
    `available` False instead of raising ModelFileError."""

    def __init__(self, folder, *, backend: str | None = None, missing_ok: bool = False):
        self.folder = Path(folder)
        self.available = False
        self.model = None
        files = model_files(self.folder, missing_ok=missing_ok)
        if files is None:
            return
        self.g_path = files.generator
        self.norm = files.norm
        self.eq = HistEqualizer.load(files.equalizer)
        self.keras = get_keras(backend)
        self.model = self._load_keras(files.generator)
        self.available = True

    @classmethod
    def shared(
        cls, folder, *, backend: str | None = None, missing_ok: bool = False
    ) -> "CTGANModel":
        """Like the constructor, but reuses a model already loaded from the same unchanged files
        while anything still holds it (inference is stateless; loading + tracing costs ~1 s)."""
        folder = Path(folder)
        files = sorted(folder.glob("*")) if folder.is_dir() else []
        key = (
            os.path.realpath(folder),
            backend,
            missing_ok,  # realpath: no RuntimeError on a link loop
            tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file()),
        )
        model = _SHARED.get(key)
        if model is None:
            model = cls(folder, backend=backend, missing_ok=missing_ok)
            _SHARED[key] = model
        return model

    def _load_keras(self, path):
        model = load_keras_model(self.keras, path, "Keras generator")
        shape_in = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else None
        if shape_in != (32, 32, 32, 1):
            raise ModelFileError(f"{path}: generator input is {shape_in}, expected (32, 32, 32, 1)")
        return model

    def generate(self, x: np.ndarray) -> np.ndarray:
        """Run the generator (inference mode) on (N, 32, 32, 32, 1) float32 -> NumPy float32.

        predict_on_batch: on one cube with TensorFlow on CPU it took 36 ms vs 110 ms for an
        eager model(x, training=False) and 230 ms for predict() (gf=2; its traced function
        is reused across calls)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = self.model.predict_on_batch(x)
        return np.asarray(self.keras.ops.convert_to_numpy(y), dtype=np.float32)

    # equalise + normalise, and back (docs/attack.md#equaliser)
    def to_net(self, cube_hu: np.ndarray) -> np.ndarray:
        return (self.eq.equalize(cube_hu) - self.norm[0]) / (self.norm[2] - self.norm[1])

    def from_net(self, x: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(x, dtype=np.float64), -0.5, 0.5)
        return self.eq.dequalize(x * (self.norm[2] - self.norm[1]) + self.norm[0])


# --------------------------------------------------------------------------------------------
# the manipulator
# --------------------------------------------------------------------------------------------
class ScanManipulator:
    """CT-GAN's scan_manipulator. `model_dir` holds INJ/ and REM/ model folders (loaded lazily).

    `published=True` is shorthand for every published behaviour: the published zoom (unless
    exact_resample is given), borders="published" and missing_model="unchanged" (each can
    also be given on its own)."""

    def __init__(self, model_dir="models", *, backend: str | None = None,
                 exact_resample: bool | None = None, noise: str = "copy",
                 cut_pad_value: float = 0.0, seed: int | None = None, published: bool = False,
                 borders: str | None = None, missing_model: str | None = None):
        if noise not in NOISE_MODES:
            raise UsageError(
                f"unknown noise mode {noise!r}; choose one of {', '.join(NOISE_MODES)}"
            )
        self.borders = borders or ("published" if published else "pad")
        self.missing_model = missing_model or ("unchanged" if published else "error")
        if self.borders not in BORDERS or self.missing_model not in MISSING_MODEL:
            raise UsageError(
                f"borders must be one of {BORDERS}, missing_model one of {MISSING_MODEL}"
            )
        self.model_dir = Path(model_dir)
        self.backend = backend
        self.exact_resample = (not published) if exact_resample is None else bool(exact_resample)
        self.noise = noise
        self.cut_pad_value = float(cut_pad_value)
        self.rng = np.random.default_rng(seed)
        self._models: dict[str, CTGANModel] = {}
        self.scan = None
        self.last_scan_shape: tuple | None = None  # scan shape after the last tamper's paste
        self.timings: collections.deque[float] = collections.deque(
            maxlen=1000
        )  # s per tamper_volume

    # --- models -------------------------------------------------------------------------------
    def model(self, action: str) -> CTGANModel:
        _check_action(action)
        if action not in self._models:
            self._models[action] = CTGANModel.shared(
                self.model_dir / SUBDIR[action],
                backend=self.backend,
                missing_ok=self.missing_model == "unchanged",
            )
        return self._models[action]

    @property
    def injector(self) -> CTGANModel:
        return self.model("inject")

    @property
    def remover(self) -> CTGANModel:
        return self.model("remove")

    # --- scan-level API (CT-GAN's load_target_scan / tamper) -------------------------------
    def set_scan(self, scan) -> None:
        """Take a Scan; keep our own float32 copy of its HU (the caller's Scan is not modified)."""
        self.scan = dataclasses.replace(scan, hu=np.array(scan.hu, dtype=np.float32, copy=True))

    def tamper(self, coord, action: str = "inject", isVox: bool = True):
        """Tamper the loaded scan at `coord` (z, y, x voxel, or world mm if isVox is False).
        Returns the slices of the scan that changed."""
        if self.scan is None:
            raise UsageError("cannot tamper: set a scan first (set_scan)")
        coord = np.asarray(coord, dtype=np.float64).reshape(-1)
        if coord.shape != (3,) or not np.all(np.isfinite(coord)):
            raise CoordinateError(
                f"coordinate must be 3 finite numbers z,y,x, got {coord.tolist()}"
            )
        vox = coord if isVox else self.scan.world2vox(coord)
        return self.tamper_volume(self.scan.hu, self.scan.spacing, vox, action, self.rng)

    # --- the pure, in-place core ------------------------------------------------------------
    def tamper_volume(self, vol: np.ndarray, spacing, coord_vox, action: str = "inject",
                      rng: np.random.Generator | None = None) -> tuple[slice, slice, slice]:
        """Tamper float HU volume `vol` (z, y, x) IN PLACE at voxel `coord_vox`.

        Touches only the reference-cube footprint and returns its bounding slices (empty
        slices if nothing changed: missing_model="unchanged" without a model)."""
        t0 = time.perf_counter()
        self.last_scan_shape = None
        _check_action(action)
        center = check_coord(coord_vox, vol.shape)
        spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
        if not np.all(spacing > 0):
            raise ScanFormatError(f"invalid voxel spacing {spacing.tolist()} mm")
        check_cube_fits(vol.shape, spacing)
        if not np.issubdtype(vol.dtype, np.floating):  # pasting blends into ints would truncate
            raise UsageError(f"tamper_volume needs a float HU volume, got {vol.dtype}")
        model = self.model(action)
        if not model.available:  # as published: a message, the scan unchanged
            print(f"warning: cannot {action}: no model in {model.folder}; scan left unchanged",
                  file=sys.stderr)
            return (slice(0, 0),) * 3
        rng = self.rng if rng is None else rng
        pad = self.cut_pad_value

        # 1. cut the cube (round(32 / spacing) voxels) and the larger reference cube
        cube_shape = self._cube_shape(spacing)
        sdim = int(np.max(cube_shape) * REF_SCALE)
        ref_shape = (sdim, sdim, sdim)
        grown = tuple(int(n) for n in vol.shape)
        if (
            self.borders == "published"
        ):  # fail where the published code fails, before touching `vol`
            grown = published_paste_shape(vol.shape, center, cube_shape)
            _published_border_check(grown, center, sdim)
        clean_unscaled = cut_cube(vol, center, cube_shape, pad).astype(np.float64)
        ben_ext = cut_cube(vol, center, ref_shape, pad).astype(np.float64)

        # 2-7. to 1 mm, generate, overflow fix, back to the scan's spacing
        mal_scaled = self._generate(model, clean_unscaled, cube_shape, spacing)
        work = vol
        if grown != vol.shape:  # the published paste returns a scan grown at its end (0 HU)
            work = np.zeros(grown, dtype=vol.dtype)
            work[tuple(slice(0, n) for n in vol.shape)] = vol
        paste_cube(work, mal_scaled, center)

        # 8. noise touch-ups on the reference-cube footprint (of the grown scan, if it grew)
        final = self._touch_up(work, center, ref_shape, ben_ext, clean_unscaled, action, rng)
        changed = paste_cube(work, final, center)
        if work is not vol:  # the caller keeps its shape: the grown scan's first slices
            changed = tuple(slice(sl.start, min(sl.stop, n)) for sl, n in zip(changed, vol.shape))
            vol[changed] = work[changed]
        self.last_scan_shape = grown
        self.timings.append(time.perf_counter() - t0)
        return changed

    def _cube_shape(self, spacing) -> np.ndarray:
        cube_shape = scaled_shape(CUBE, 1.0 / spacing)
        if np.any(cube_shape < 1):
            raise AttackShapeError(
                f"voxel spacing {spacing.tolist()} mm is too coarse for a 32 mm cube"
            )
        if not self.exact_resample:
            msg = published_shape_error(spacing)
            if msg:
                raise AttackShapeError(msg)
        return cube_shape

    def _generate(self, model: CTGANModel, clean_unscaled, cube_shape, spacing) -> np.ndarray:
        """Steps 2-7 without the paste: the generated cube at the scan's spacing."""
        if self.exact_resample:
            clean = resample_exact(clean_unscaled, CUBE)
        else:
            clean = scale_published(clean_unscaled, spacing)
        x = model.to_net(clean)            # equalise + normalise
        x[MASK] = 0
        y = model.generate(x.reshape(1, 32, 32, 32, 1).astype(np.float32))
        mal_cube = fix_overflow(model.from_net(y.reshape(32, 32, 32)))
        if self.exact_resample:
            return resample_exact(mal_cube, cube_shape)
        return scale_published(mal_cube, 1.0 / spacing)

    def _touch_up(self, vol, center, ref_shape, ben_ext, clean_unscaled, action, rng) -> np.ndarray:
        """The final reference-cube block: generated + noise blended into the benign block."""
        pad = self.cut_pad_value
        mal_ext = cut_cube(vol, center, ref_shape, pad).astype(np.float64)
        sdim = ref_shape[0]
        k = kern01(sdim, KERNEL_SIGMA[action])
        if self.noise == "copy":
            noise = copy_noise(vol, ref_shape, pad)
        else:
            noise = gaussian_noise(clean_unscaled, ref_shape, action, rng)
        return blend(mal_ext, ben_ext, noise, k, action)

    def footprint(self, vol_shape, spacing, coord_vox) -> tuple[slice, slice, slice]:
        """The slices tamper_volume would touch (the reference cube, clipped to the volume)."""
        center = check_coord(coord_vox, vol_shape)
        cube_shape = scaled_shape(CUBE, 1.0 / np.asarray(spacing, dtype=np.float64))
        sdim = int(np.max(cube_shape) * REF_SCALE)
        _, _, a, b = cube_bounds(center, (sdim,) * 3, vol_shape)
        return tuple(slice(int(lo), int(hi)) for lo, hi in zip(a, b))


# --------------------------------------------------------------------------------------------
# noise touch-ups (docs/attack.md#touch-ups)
# --------------------------------------------------------------------------------------------
def published_paste_shape(vol_shape, center, cube_shape) -> tuple[int, ...]:
    """Shape of the scan CT-GAN's pasteCube returns for a cube of `cube_shape` at `center`.

    Its border test compares the centre on every axis with every half-side, so a non-cubic
    cube "crosses" when centre - H < 0 or centre + H + 1 > size on any axis, H the largest
    round(side / 2). It then pads every axis by 2 x max(side) but crops back by only each
    axis' own side: axis i grows at its end by 2 x (max(side) - side_i) slices (at 2.5 mm and
    0.57 mm pixels: 2 x (56 - 13) = 86 slices). A cubic cube never grows the scan."""
    cs = np.asarray(cube_shape, dtype=np.int64)
    shape = np.asarray(vol_shape[:3], dtype=np.int64)
    c = np.asarray(center, dtype=np.int64)
    h = np.max(np.round(cs / 2))
    if np.any(c - h < 0) or np.any(c + h + 1 > shape):
        return tuple(int(n) for n in shape + 2 * (cs.max() - cs))
    return tuple(int(n) for n in shape)


def published_cut_pads(vol_shape, center, shape) -> bool:
    """Whether CT-GAN's cutCube pads: centre - round(side / 2) < 0 or centre + round(side / 2)
    + 1 > size on some axis (a cube that ends exactly at the border counts as crossing)."""
    hl = np.round(np.broadcast_to(np.asarray(shape, dtype=np.float64), (3,)) / 2)
    c = np.asarray(center, dtype=np.int64)
    return bool(np.any(c - hl < 0) or np.any(c + hl + 1 > np.asarray(vol_shape[:3])))


def _published_border_check(vol_shape, center, sdim):
    """Raise AttackBorderError where a published touch-up cut (reference cube at `center`,
    copy-noise block at the scan's middle) would need padding, on a scan of `vol_shape`."""
    shape = np.asarray(vol_shape[:3])
    for name, c in (
        ("reference cube", center),
        ("copy-noise block", noise_block_center(vol_shape)),
    ):
        if published_cut_pads(shape, c, sdim):
            raise AttackBorderError(
                f"the {name} of side {sdim} at (z,y,x)={tuple(int(v) for v in c)} leaves the scan of "
                f"shape {tuple(int(v) for v in shape)}: the published attack fails there (ValueError in "
                f"cutCube); use the default attack, which pads"
            )


def copy_noise(vol: np.ndarray, ref_shape, pad: float = 0.0) -> np.ndarray:
    """Noise copied from a fixed block at (depth/2, 0.43 rows, 0.27 cols) of the (tampered) scan:
    voxels above -800 HU become the mean of those below, then the block's mean is subtracted.

    Deterministic. If no voxel is below -800 (the published code would give NaN) the noise is 0."""
    block = cut_cube(vol, noise_block_center(vol.shape), ref_shape, pad)
    return noise_from_block(block.astype(np.float64))


def gaussian_noise(local_sample: np.ndarray, ref_shape, action: str,
                   rng: np.random.Generator) -> np.ndarray:
    """Smoothed Gaussian noise: N(0, sd) with sd = 0.6 * std(lung HU) (inject) or 30 (remove),
    zoomed by rf = 1.3 * 60 / std(lung HU) (lung = local cube voxels < -600), cropped.

    Draws only the (ref / rf + 2)^3 values the crop needs instead of the published 150x200x300.
    No lung voxels in the local cube (published: NaN) -> zero noise."""
    lung = local_sample[local_sample < -600]
    sd_lung = float(lung.std()) if lung.size > 1 else 0.0
    if sd_lung <= 0:
        return np.zeros(ref_shape)
    sd = 0.6 * sd_lung if action == "inject" else 30.0
    rf = 60.0 / sd_lung * 1.3
    n = tuple(int(np.ceil(s / rf)) + 2 for s in ref_shape)
    field = rng.standard_normal(n) * sd
    zoomed = scipy.ndimage.zoom(field, rf, mode="nearest")
    if any(z < s for z, s in zip(zoomed.shape, ref_shape)):  # rounding guard
        zoomed = np.pad(
            zoomed, [(0, max(0, s - z)) for z, s in zip(zoomed.shape, ref_shape)], mode="edge"
        )
    return zoomed[: ref_shape[0], : ref_shape[1], : ref_shape[2]]


# --------------------------------------------------------------------------------------------
def _check_action(action):
    if action not in ACTIONS:
        raise UsageError(f"unknown action {action!r}; choose inject or remove")
