"""MITS-GAN configuration: one typed dataclass, presets, CLI overrides.

    python train.py --preset demo --epochs 3 --out_dir runs/try1

Every field is a `--name value` flag (booleans take true/false); unknown flags are rejected.
The resolved config is written next to every run and inside every checkpoint.

Presets:
  paper      the published architecture and hyper-parameters (docs/training.md) with our
             engineering fixes (float32, scan in memory, counted attacker errors, exact 32^3
             resampling, seeds, checkpoints). This is the default.
  reference  the published code's behaviour, quirks included (float64, whole-scan re-read per
             step, near-end rule, silent zero on attacker errors, HU mapping by slab min-max,
             CT-GAN's border cut/paste, bias-free D); each is a field (docs/fidelity.md).
  demo       small networks on CPU in minutes, on the real scans resampled to 2.5 mm.
  whitebox   our recommended model (beyond the paper): U-Net on slabs with a perturbation
             bound in HU, PatchGAN, gradients through a PyTorch port of CT-GAN (inject and remove
             each step), tamper inside the slab and the lungs, int16 quantisation in the loop.
             (`--preset default` is its former name and still works.)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from utils.atomic import atomic_write_bytes
from utils.errors import CliParser, ModelFileError, UsageError


@dataclass
class Config:
    preset: str = "paper"
    # --- data -------------------------------------------------------------------------------
    data_dir: str = "data/z2.5"        # .mhd files and/or DICOM series folders
    models_dir: str = "models"         # CT-GAN models: models/INJ, models/REM
    out_dir: str = "runs/paper"        # config, checkpoints, samples, TensorBoard, exports
    # --- networks ---------------------------------------------------------------------------
    generator: str = "published"       # published (noise net + residual trunk) | unet
    discriminator: str = "published"   # published (ndf 1, one probability per slice) | patch
    slab: int = 4                      # slices per sub-batch (published 4)
    g_width: int = 64                  # published G: 64 channels; U-Net: base width
    g_blocks: int = 3                  # published G: residual blocks
    d_width: int = 1                   # published D: ndf 1; PatchGAN: ndf
    d_bias: bool = True                # conv biases in the published D (published: none)
    d_sigmoid: bool = False            # published D ends in sigmoid + BCELoss (ours: logits)
    eps_hu: float = 0.0                # perturbation bound in HU for the U-Net (0 = none)
    # --- optimisation (docs/training.md#one-step) ---------------------------------------------------
    epochs: int = 5
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lambda_disrupt: float = 0.1        # L_G = adv - lambda * MSE(x_p, T)
    max_steps: int = 0                 # stop after this many sub-batch steps (0 = all epochs)
    dtype: str = "float32"             # float32 | float64 (published)
    device: str = "auto"               # auto (CUDA when present) | cpu | cuda | cuda:N
    seed: int = 0                      # -1 = unseeded (published)
    fidelity_weight: float = 0.0       # + w * MSE(x_p, x) (0 = none, as published)
    batch: int = 1                     # slabs per step, over all ranks (published 1); each slab
    # is its own forward pass, so norms see one slab as published
    # --- speed (bench.py measures them: docs/performance.md) ------------------------------------------------
    amp: str = "off"  # off | bf16: autocast G and D (not the attacker); float32 only
    channels_last: bool = False        # NHWC memory layout for G and D (faster convs on GPU)
    compile: bool = False              # torch.compile G and D (pays on GPU for long runs)
    # --- the frozen CT-GAN attacker during training -----------------------------------------
    attack_mode: str = "blackbox"      # blackbox: published constant target T (Keras, NumPy)
                                       # whitebox: gradients through the PyTorch CT-GAN port
    whitebox_both: bool = False        # whitebox: inject and remove at every step
    whitebox_cube: bool = False        # whitebox: protect every slab the attacked cube touches
                                       # (as protect.py does), not only the step's slab
    # untargeted white-box levers (docs/training.md "Untargeted protection: what each lever does")
    wb_locations: int = 1              # whitebox: tamper locations per slab and step (one batched
                                       # CT-GAN call per action)
    wb_shift: int = 0                  # whitebox: random offset of each cube centre, up to this
                                       # many voxels per axis (the attacker clicks by hand)
    wb_touchups: str = "none"          # whitebox: none (attack steps 1-7) | copy: step 8 too, the
                                       # noise touch-ups (docs/attack.md#pytorch-port)
    ensemble_models: str = ""          # whitebox: more CT-GAN model folders (each with INJ/ and
                                       # REM/), comma-separated; the loss averages all attackers
    quantize: bool = False             # round protected HU to integers before the attacker
                                       # (straight-through in whitebox): survives int16 storage
    keras_backend: str = ""            # "" = tensorflow when installed, else torch
    attacker_impl: str = "auto"  # black box: keras | torch (procedures.attacker.torch_attacker, the
    # same within 2 HU, on the device) | auto: torch on a GPU
    exact_resample: bool = (
        True  # resample CT-GAN cubes to exactly 32^3 (docs/attack.md#exact-resampling)
    )
    near_end_rule: bool = True         # published: term only when 32 < s and s + 32 < depth
    tamper_z: str = "published"        # published: z = s + 8 | slab: the slab's middle slice
    tamper_yx: str = "published"       # published: y, x uniform in [90, 410] (scaled to size)
    hu_mapping: str = "published"      # published: slab min-max | volume: exact inverse of norm
    attack_errors: str = "count"       # count (logged, step has no term) | silent (published)
    reread_scan: bool = False          # published: re-read the scan from disk per eligible step
    attack_borders: str = "pad"        # pad: cubes crossing the scan end are padded with 0 HU
                                       # published: CT-GAN's cut/paste (fails or grows the scan)
    missing_model: str = "error"       # error | unchanged (published: message, scan unchanged)
    span_guard: bool = True            # a constant slab maps with span 1 (published: NaN)
    mhd_only: bool = False             # published ScanDataset lists only .mhd files
    # --- logging / outputs ------------------------------------------------------------------
    log_every: int = 10                # TensorBoard scalars every N steps
    sample_every: int = 50             # sample grid PNG every N steps (0 = never)
    ckpt_every: int = 200  # checkpoint every N steps and always at the end (0: only there)
    save_img_result: bool = False      # export protected scans (HU, source geometry) at the end
    resume: str = ""                   # checkpoint path, or "auto" = out_dir/checkpoint.pt
    progress: bool = True              # tqdm bars

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        atomic_write_bytes(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())


PRESETS: dict[str, dict] = {
    "paper": {},
    "reference": dict(
        out_dir="runs/reference", dtype="float64", seed=-1, exact_resample=False,
        attack_errors="silent", reread_scan=True, hu_mapping="published", attacker_impl="keras",
        near_end_rule=True, tamper_z="published", tamper_yx="published", d_bias=False,
        d_sigmoid=True, attack_borders="published", missing_model="unchanged", span_guard=False,
        mhd_only=True),
    "whitebox": dict(
        out_dir="runs/whitebox", generator="unet", discriminator="patch", g_width=32, d_width=32,
        eps_hu=10.0, fidelity_weight=10.0, attack_mode="whitebox", whitebox_both=True,
        whitebox_cube=True, quantize=True, lambda_disrupt=1.0, tamper_z="slab", tamper_yx="lung",
        hu_mapping="volume", near_end_rule=False,
        # At 2e-4 the bounded white-box model barely leaves x_p = x (docs/results.md, how the
        # white-box mode was made to learn).
        lr_g=1e-3),
    "demo": dict(
        out_dir="runs/demo", generator="unet", discriminator="patch", g_width=8, d_width=8,
        epochs=2, tamper_z="slab", tamper_yx="lung", hu_mapping="volume", near_end_rule=False,
        sample_every=20, ckpt_every=50, save_img_result=True),
}

# Former preset names: still accepted, with a one-line notice on stderr.
PRESET_ALIASES = {"default": "whitebox"}

CHOICES = {
    "generator": ("published", "unet"),
    "discriminator": ("published", "patch"),
    "dtype": ("float32", "float64"),
    "tamper_z": ("published", "slab"),
    "tamper_yx": ("published", "lung"),
    "hu_mapping": ("published", "volume"),
    "attack_errors": ("count", "silent"),
    "keras_backend": ("", "tensorflow", "torch"),
    "attacker_impl": ("auto", "keras", "torch"),
    "attack_mode": ("blackbox", "whitebox"),
    "wb_touchups": ("none", "copy"),
    "amp": ("off", "bf16"),
    "attack_borders": ("pad", "published"),
    "missing_model": ("error", "unchanged"),
}



def _parse_bool(s: str) -> bool:
    low = s.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _field_type(f) -> type:
    t = f.type
    if isinstance(t, str):
        t = {"str": str, "int": int, "float": float, "bool": bool}[t]
    return t


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = CliParser(description=description or __doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        t = _field_type(f)
        kw = dict(default=None, help=f"(default from preset; base {f.default!r})")
        if t is bool:
            kw["type"] = _parse_bool
            kw["metavar"] = "BOOL"
        else:
            kw["type"] = t
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        if f.name == "preset":
            kw["choices"] = tuple(PRESETS) + tuple(PRESET_ALIASES)
        p.add_argument(f"--{f.name}", **kw)
    return p


def make_config(preset: str = "paper", **overrides) -> Config:
    if preset in PRESET_ALIASES:
        print(f"note: preset {preset!r} is now called {PRESET_ALIASES[preset]!r}", file=sys.stderr)
        preset = PRESET_ALIASES[preset]
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **overrides, "preset": preset}
    names = {f.name for f in fields(Config)}
    unknown = set(values) - names
    if unknown:
        raise UsageError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"--{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    for name in ("slab", "epochs", "g_width", "d_width", "batch"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    if cfg.eps_hu < 0 or cfg.fidelity_weight < 0:
        raise UsageError("--eps_hu and --fidelity_weight must be >= 0")
    if cfg.eps_hu > 0 and cfg.generator != "unet":
        raise UsageError("--eps_hu needs --generator unet (the published generator is unbounded)")
    if cfg.wb_locations < 1 or cfg.wb_shift < 0:
        raise UsageError("--wb_locations must be >= 1 and --wb_shift >= 0")
    if cfg.attack_mode != "whitebox" and (
        cfg.wb_locations != 1 or cfg.wb_shift or cfg.ensemble_models
    ):
        raise UsageError(
            "--wb_locations, --wb_shift and --ensemble_models need --attack_mode whitebox"
        )
    if cfg.amp != "off" and cfg.dtype != "float32":
        raise UsageError("--amp bf16 needs --dtype float32 (autocast does not lower float64)")
    _validate_numbers(cfg)


def _validate_numbers(cfg: Config) -> None:
    """Finite rates and weights, no negative counts: a NaN learning rate or a negative step
    limit would otherwise run (and checkpoint) without learning anything."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"--{f.name} must be a finite number, got {v}")
    for name in ("lr_g", "lr_d"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name} must be > 0")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise UsageError("--beta1 and --beta2 must be in [0, 1)")
    # ckpt_every 0 = only at the end: a valid choice, and saved configs carry it
    for name in ("max_steps", "sample_every", "ckpt_every", "lambda_disrupt"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name} must be >= 0")
    if cfg.log_every < 1:
        raise UsageError("--log_every must be >= 1")
    if cfg.seed < -1:
        raise UsageError("--seed must be >= -1 (-1 = unseeded)")


def given_flags(argv=None, description: str = "") -> dict:
    """Only the flags written on the command line (preset included when given)."""
    ns = build_parser(description).parse_args(argv)
    return {k: v for k, v in vars(ns).items() if v is not None}


def parse_args(argv=None, description: str = "") -> Config:
    given = given_flags(argv, description)
    preset = given.pop("preset", "paper")
    return make_config(preset, **given)


# Fields a resumed run may change: where and how long it runs, not what it trains.
RESUMABLE_OVERRIDES = ("out_dir", "resume", "progress", "max_steps", "epochs", "device",
                       "log_every", "sample_every", "ckpt_every", "save_img_result",
                       "channels_last", "compile")


def checkpoint_config(state, path) -> Config:
    """The Config saved in a train.py checkpoint `state` (read from `path`); a one-line
    ModelFileError when it is missing or not a MITS-GAN config."""
    try:
        return load_config_dict(dict(state["config"]))
    except (UsageError, KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: checkpoint config is not a MITS-GAN config ({e})") from None


def load_config_dict(d: dict) -> Config:
    """Rebuild a Config saved in a checkpoint/run folder (unknown keys are an error)."""
    names = {f.name for f in fields(Config)}
    unknown = set(d) - names
    if unknown:
        raise UsageError(f"saved config has unknown field(s): {', '.join(sorted(unknown))}")
    cfg = Config(**d)
    validate(cfg)
    return cfg
