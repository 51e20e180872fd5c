"""TAFIM (Aneja et al., ECCV 2022), the published baseline, adapted to CT.

    python -m procedures.baselines.tafim --data data/z2.5 --models models --out runs/tafim --steps 2000
    python -m procedures.baselines.tafim --width 16 --max-minutes 5          # a CPU-sized run

TAFIM as published (its public code): a pix2pix U-Net ("unet_64": 6 down-convolutions, 64
filters, InstanceNorm, dropout 0.5 in the inner 8x-width blocks, tanh) takes [image, a learned
global noise tensor] on channels and outputs a perturbation d; protected = clamp(x + d, -1, 1).
Loss = MSE(M(protected), target) + 10 * MSE(protected, x), M the differentiable manipulation
model and the target a uniform image; the global noise (initialised uniform [0, 1)) is trained
with the network (Adam lr 1e-4, batch 1) and also gets the same loss as a perturbation on its
own ("global term": MSE(M(clamp(x + g)), target) + 10 * MSE(clamp(x + g), x)).

Our CT adaptation (MITS-GAN's authors did not publish theirs):
- Images are slabs of `slab` consecutive slices (default 4, as MITS-GAN; --slab 1 = per slice)
  at full resolution, in the volume's normalised [-1, 1] units (per-volume min-max, ScanDataset).
  The slices of a slab are channels (TAFIM's RGB); the global noise has one channel per slice.
  The global noise is a (slab, N, N) parameter (N = --noise-size, default 512) resized
  bilinearly to the slice size, so any size works (identity for 512 x 512 slices).
- M = CT-GAN's inject/remove of one location through procedures.attacker.port.DifferentiableTamper
  (the same Keras G_model.h5 files the evaluation attacks with; docs/attack.md#pytorch-port, steps 1-7, cubic
  spline resampling as scipy, straight-through clamp of the generator output so saturation does
  not stop the gradient). Inject on even steps, remove on odd ones (MITS-GAN's alternation).
  Location: the slab's middle slice, (y, x) a uniform voxel of the lung mask on that slice
  (procedures.protection.disruption.Locator, tamper_z=slab, tamper_yx=lung).
- One sample (TAFIM's batch of 1) = one tamper: every slab of the protection tiling
  (procedures.protection.apply.slab_starts, as used at protection time) that meets the 32 mm cube's
  z-range is protected with gradient, so CT-GAN sees the cube exactly as it would in a protected
  scan. M(protected) = the tampered cube (its part inside the scan) in normalised units.
- Target: a uniform cube. `--target 0` (default): the constant 0 in normalised units, i.e. the
  middle of the volume's HU range (as TAFIM, a fixed value of the image space); `--target
  -850hu`: a fixed HU value; `--target lung`: the mean HU of the scan's lung mask (a flat patch
  of lung).
- The perturbation term MSE(protected, x) runs over all protected slabs (whole slices).
- Protection (`protect_hu`) runs the net slab by slab over a whole volume in eval mode (dropout
  off; InstanceNorm has no running statistics, so it is the training computation) with the last
  slab aligned to the end, like procedures.protection.apply.protect_hu.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from procedures.protection.apply import run_slabs, slab_starts, slabs_meeting
from scanDataset import ScanDataset
from utils.atomic import atomic_write_text
from utils.checkpoint import load_state_into, save_checkpoint, torch_load_weights
from utils.cubes import cube_bounds
from utils.device import pick_device
from utils.errors import CliParser, InputFileError, ModelFileError, OutputError, UsageError, run_cli

ACTIONS = ("inject", "remove")
CKPT_KIND = "tafim"


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class TafimConfig:
    # network (defines the checkpoint's weights)
    slab: int = 4                      # slices per image (channels)
    width: int = 64                    # ngf: filters of the first conv (TAFIM 64)
    depth: int = 6                     # down-convolutions (TAFIM's unet_64: 6)
    dropout: bool = True               # pix2pix dropout 0.5 in the inner 8x-width blocks
    noise_size: int = 512              # side of the learned global noise tensor
    # training (TAFIM's paper and public code)
    perturb_weight: float = 10.0
    lr: float = 1e-4
    target: str = "0"                  # "0" (normalised), "<v>hu", or "lung"
    global_term: bool = True           # the published code's loss on the global noise alone
    seed: int = 0
    # provenance
    data: str = "data/z2.5"
    models: str = "models"

    ARCH = ("slab", "width", "depth", "dropout", "noise_size")

    def validate(self) -> "TafimConfig":
        for name in ("slab", "width", "depth", "noise_size"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.depth < 2:
            raise UsageError(f"--depth must be >= 2 (a U-Net needs an inner block), got {self.depth}")
        if not self.lr > 0 or self.perturb_weight < 0:
            raise UsageError("--lr must be > 0 and --perturb-weight >= 0")
        parse_target(self.target)
        return self

    @classmethod
    def from_dict(cls, d: dict, source: str = "checkpoint") -> "TafimConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ModelFileError(f"{source}: not a TAFIM config (unknown fields {', '.join(unknown)})")
        try:
            return cls(**d).validate()
        except (TypeError, ValueError, UsageError) as e:
            raise ModelFileError(f"{source}: bad TAFIM config ({e})") from None


def parse_target(text: str) -> tuple[str, float | None]:
    """'0' / '-0.5' -> ('norm', v); '-850hu' -> ('hu', -850); 'lung' -> ('lung', None)."""
    t = str(text).strip().lower()
    if t == "lung":
        return "lung", None
    try:
        if t.endswith("hu"):
            return "hu", float(t[:-2])
        v = float(t)
    except ValueError:
        raise UsageError(f"--target {text!r}: expected a number in [-1, 1] (normalised units), "
                         f"a HU value like -850hu, or 'lung'") from None
    if not -1.0 <= v <= 1.0:
        raise UsageError(f"--target {text!r}: a normalised target must lie in [-1, 1]")
    return "norm", v


# ----------------------------------------------------------------------------------------------
# the protection network
# ----------------------------------------------------------------------------------------------
def _init_pix2pix(m: nn.Module) -> None:
    """pix2pix 'normal' init (TAFIM's init_type, gain 0.02): conv weights N(0, 0.02), biases 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class TafimUNet(nn.Module):
    """pix2pix UnetGenerator (TAFIM's protection net) on [slab, global noise] -> perturbation d.

    Level i (0 = outermost) has width * min(2^i, 8) channels; down: LeakyReLU 0.2, conv 4x4 s2,
    InstanceNorm (none at the outermost and innermost levels); up: ReLU, transposed conv 4x4 s2,
    InstanceNorm (+ Dropout 0.5 on levels 4..depth-2), concatenated with the skip; the outermost
    up-convolution ends in tanh. InstanceNorm without affine parameters, so convs have biases
    (pix2pix's use_bias for InstanceNorm). Any slice size: padded (replicate) to a multiple of
    2^depth and cropped back.
    """

    def __init__(self, slab: int = 4, width: int = 64, depth: int = 6, dropout: bool = True,
                 noise_size: int = 512):
        super().__init__()
        self.slab, self.depth = int(slab), int(depth)
        ch = [width * min(2 ** i, 8) for i in range(depth)]
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for i in range(depth):
            cin = 2 * slab if i == 0 else ch[i - 1]
            self.down.append(nn.Conv2d(cin, ch[i], 4, stride=2, padding=1))
            cout = slab if i == 0 else ch[i - 1]
            up_in = ch[i] if i == depth - 1 else 2 * ch[i]   # innermost: no skip concatenated yet
            self.up.append(nn.ConvTranspose2d(up_in, cout, 4, stride=2, padding=1))
        self.down_norm = nn.ModuleList([nn.InstanceNorm2d(ch[i]) if 0 < i < depth - 1 else nn.Identity()
                                        for i in range(depth)])
        self.up_norm = nn.ModuleList([nn.InstanceNorm2d(ch[i - 1]) if i > 0 else nn.Identity()
                                      for i in range(depth)])
        self.up_drop = nn.ModuleList([nn.Dropout(0.5) if dropout and 4 <= i <= depth - 2 else nn.Identity()
                                      for i in range(depth)])
        self.apply(_init_pix2pix)
        # TAFIM: init_adversarial_noise(mode="rand"), a learned image-sized tensor.
        self.global_noise = nn.Parameter(torch.rand(slab, noise_size, noise_size))

    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        """The global noise at the size of x (B, S, H, W): (1, S, H, W)."""
        g = self.global_noise.unsqueeze(0).to(x.dtype)
        if tuple(g.shape[-2:]) != tuple(x.shape[-2:]):
            g = F.interpolate(g, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return g

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        """d in [-1, 1], shape of x (B, S, H, W)."""
        b, s, h, w = x.shape
        if s != self.slab:
            raise UsageError(f"TAFIM net built for slabs of {self.slab} slices, got {s}")
        z = torch.cat([x, self.noise_like(x).expand(b, -1, -1, -1)], dim=1)
        m = 2 ** self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            z = F.pad(z, (0, pw, 0, ph), mode="replicate")
        skips = []
        for i in range(self.depth):
            if i > 0:
                z = F.leaky_relu(z, 0.2)
            z = self.down_norm[i](self.down[i](z))
            skips.append(z)
        z = skips.pop()
        for i in reversed(range(self.depth)):
            z = self.up[i](F.relu(z))
            if i == 0:
                z = torch.tanh(z)
                break
            z = self.up_drop[i](self.up_norm[i](z))
            z = torch.cat([skips.pop(), z], dim=1)           # pix2pix: cat([x, submodule(x)])
        return z[..., :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The protected slab clamp(x + d, -1, 1)."""
        return torch.clamp(x + self.perturbation(x), -1.0, 1.0)

    def global_protect(self, x: torch.Tensor) -> torch.Tensor:
        """The global noise used alone as a perturbation (the published global term)."""
        return torch.clamp(x + self.noise_like(x), -1.0, 1.0)


def build_model(cfg: TafimConfig) -> TafimUNet:
    return TafimUNet(cfg.slab, cfg.width, cfg.depth, cfg.dropout, cfg.noise_size)


# ----------------------------------------------------------------------------------------------
# the loss: CT-GAN through the differentiable tamper
# ----------------------------------------------------------------------------------------------
def _assemble(xp: torch.Tensor, starts: list[int]) -> tuple[torch.Tensor, int]:
    """Slices [first start, last start + slab) from the slabs xp (k, S, H, W); where slabs
    overlap (the last slab is aligned to the end of the volume) the later one wins, as in
    protect_hu."""
    slab = xp.shape[1]
    z0, z1 = starts[0], starts[-1] + slab
    src = np.zeros(z1 - z0, dtype=np.int64)
    for j, s in enumerate(starts):
        src[s - z0:s - z0 + slab] = j * slab + np.arange(slab)
    flat = xp.reshape(-1, *xp.shape[2:])
    return flat.index_select(0, torch.from_numpy(src).to(xp.device)), z0


class TafimObjective:
    """TAFIM's loss for one tamper sample; holds the frozen CT-GAN (DifferentiableTamper)."""

    def __init__(self, tamper, cfg: TafimConfig):
        self.tamper = tamper
        self.cfg = cfg
        self.target_kind, self.target_value = parse_target(cfg.target)
        self._lung_mean: dict[str, float] = {}

    @classmethod
    def from_model_dirs(cls, models, cfg: TafimConfig, device=None) -> "TafimObjective":
        from procedures.attacker.port import DifferentiableTamper  # lazy: the attacker pulls SciPy

        models = Path(models)
        for sub in ("INJ", "REM"):
            if not (models / sub).is_dir():
                raise ModelFileError(f"{models / sub}: CT-GAN model folder not found")
        dt = DifferentiableTamper.from_model_dirs(models / "INJ", models / "REM", device=device,
                                                  resample="spline", clamp="straight_through",
                                                  work_dtype=torch.float32)
        return cls(dt, cfg)

    def target_norm(self, item) -> float:
        """The uniform target in the item's normalised units."""
        span = max(item.hu_max - item.hu_min, 1.0)
        if self.target_kind == "norm":
            return float(self.target_value)
        if self.target_kind == "hu":
            hu = float(self.target_value)
        else:
            hu = self._lung_mean.get(item.path)
            if hu is None:
                from utils.lung import lung_mask  # lazy: SciPy only for the lung-mean target

                mask = lung_mask(item.scan.hu)
                hu = float(item.scan.hu[mask].mean()) if mask.any() else -850.0
                self._lung_mean[item.path] = hu
        return (hu - item.hu_min) / span * 2.0 - 1.0

    def cube_slabs(self, item, center) -> list[int]:
        depth = item.volume.shape[0]
        cut = self.tamper.cut_shape(item.scan.spacing)
        _, _, a, e = cube_bounds(center, cut, item.volume.shape)
        return slabs_meeting(depth, self.cfg.slab, int(a[0]), int(max(e[0], a[0] + 1)))

    def _recon(self, sub: torch.Tensor, z0: int, item, center, action, target: float) -> torch.Tensor:
        span = max(item.hu_max - item.hu_min, 1.0)
        sub_hu = (sub.float() + 1.0) / 2.0 * span + item.hu_min
        c = (int(center[0]) - z0, int(center[1]), int(center[2]))
        part, _ = self.tamper.footprints(sub_hu, item.scan.spacing, c, action)[0]
        part_n = (part - item.hu_min) / span * 2.0 - 1.0
        return (part_n - target).pow(2).mean()

    def loss(self, model: TafimUNet, item, center, action: str) -> tuple[torch.Tensor, dict]:
        """(loss, parts) for one tamper of `item` at voxel `center` (z, y, x)."""
        starts = self.cube_slabs(item, center)
        dev = next(model.parameters()).device
        x = torch.stack([item.volume[s:s + self.cfg.slab] for s in starts]).to(dev, torch.float32)
        target = self.target_norm(item)
        xp = model(x)
        sub, z0 = _assemble(xp, starts)
        recon = self._recon(sub, z0, item, center, action, target)
        perturb = F.mse_loss(xp, x)
        loss = recon + self.cfg.perturb_weight * perturb
        parts = {"recon": recon.item(), "perturb": perturb.item()}
        if self.cfg.global_term:
            xg = model.global_protect(x)
            sub_g, _ = _assemble(xg, starts)
            recon_g = self._recon(sub_g, z0, item, center, action, target)
            perturb_g = F.mse_loss(xg, x)
            loss = loss + recon_g + self.cfg.perturb_weight * perturb_g
            parts.update(recon_global=recon_g.item(), perturb_global=perturb_g.item())
        with torch.no_grad():
            span = max(item.hu_max - item.hu_min, 1.0)
            parts["pert_rms_hu"] = float((xp - x).pow(2).mean().sqrt()) * span / 2.0
        parts["loss"] = loss.item()
        parts["slabs"] = len(starts)
        return loss, parts


# ----------------------------------------------------------------------------------------------
# protection of whole volumes
# ----------------------------------------------------------------------------------------------
def protect_hu(model: TafimUNet, hu: np.ndarray, device="cpu", *, hu_min: float | None = None,
               hu_max: float | None = None, batch: int = 4, out: np.ndarray | None = None,
               progress=None, desc: str = "TAFIM protect") -> np.ndarray:
    """Protect the HU volume `hu` (z, y, x) slab by slab with the TAFIM net; protected HU.

    procedures.protection.apply.run_slabs: normalisation as in training (min-max of the volume to
    [-1, 1], or hu_min/hu_max as given); `out` (default float32) receives the result, an
    integer `out` gets rounded, clipped values."""
    model.eval()
    if hu.shape[0] < model.slab:
        raise UsageError(f"TAFIM: volume has {hu.shape[0]} slices, fewer than a slab of {model.slab}")
    return run_slabs(lambda x, _starts: model(x), hu, model.slab, device, hu_min=hu_min,
                     hu_max=hu_max, dtype=next(model.parameters()).dtype, batch=batch, out=out,
                     progress=progress, desc=desc)


def tafim_method(model: TafimUNet, device="cpu", *, batch: int = 4, progress=None,
                 label: str = "TAFIM"):
    """A procedures.evaluation.methods.ProtectionMethod protecting with the TAFIM net."""
    from procedures.evaluation.methods import ProtectionMethod  # lazy: evaluation pulls SciPy

    def run(item) -> np.ndarray:
        hu = item.scan.hu
        out = np.empty(hu.shape, dtype=hu.dtype if np.issubdtype(hu.dtype, np.integer) else np.float32)
        return protect_hu(model, hu, device, hu_min=item.hu_min, hu_max=item.hu_max, batch=batch,
                          out=out, progress=progress, desc=f"TAFIM {Path(item.path).name}")

    return ProtectionMethod("tafim", label, run)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def checkpoint_state(model: TafimUNet, cfg: TafimConfig, step: int, optimizer=None,
                     history: list | None = None) -> dict:
    """A weights_only-loadable dict: tensors, numbers, strings, lists and dicts only."""
    return {"kind": CKPT_KIND, "config": asdict(cfg), "step": int(step),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "history": list(history or [])}


def read_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: TAFIM checkpoint not found" if not path.exists()
                             else f"{path}: TAFIM checkpoint is not a file")
    state = torch_load_weights(path, what="TAFIM checkpoint")
    if not isinstance(state, dict) or state.get("kind") != CKPT_KIND or "model" not in state \
            or not isinstance(state.get("config"), dict):
        raise ModelFileError(f"{path}: not a TAFIM checkpoint (kind {state.get('kind') if isinstance(state, dict) else None!r})")
    return state


def load_tafim(path, device="cpu") -> tuple[TafimUNet, TafimConfig, dict]:
    """(model in eval mode on `device`, its config, the whole checkpoint dict)."""
    state = read_checkpoint(path)
    cfg = TafimConfig.from_dict(state["config"], str(path))
    model = build_model(cfg)
    load_state_into(model, state["model"], path, "TAFIM model")
    return model.to(device).eval(), cfg, state


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def step_seeds(seed: int, step: int) -> tuple[np.random.Generator, int]:
    """All randomness of a step (volume, slab, location; dropout) from (seed, step): a resumed
    run draws what the uninterrupted one would have."""
    ss = np.random.SeedSequence([int(seed), int(step)])
    return np.random.default_rng(ss), int(ss.generate_state(1, np.uint64)[0] % 2**63)


def draw_sample(items, locator, cfg: TafimConfig, step: int, rng: np.random.Generator):
    """(item, center, action) of a step: a random volume and slab of the protection tiling; the
    location in the lungs on the slab's middle slice; inject on even steps, remove on odd."""
    item = items[int(rng.integers(len(items)))]
    starts = slab_starts(item.volume.shape[0], cfg.slab)
    s = starts[int(rng.integers(len(starts)))]
    center = locator.location(item, s, rng)
    return item, center, ACTIONS[step % 2]


def make_locator(cfg: TafimConfig):
    from procedures.protection.disruption import Locator  # lazy: disruption pulls SciPy

    return Locator(SimpleNamespace(slab=cfg.slab, tamper_z="slab", tamper_yx="lung", near_end_rule=False))


def train_steps(model, objective, optimizer, items, locator, cfg: TafimConfig, start: int, stop: int,
                *, progress=None, deadline: float | None = None, on_step=None) -> list[dict]:
    """Run steps [start, stop) (or until `deadline`, a time.monotonic() value); per-step records."""
    records = []
    it = range(start, stop)
    bar = progress(it, desc="TAFIM", unit="step", initial=start, total=stop) if progress else None
    for step in (bar if bar is not None else it):
        if deadline is not None and time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        rng, tseed = step_seeds(cfg.seed, step)
        item, center, action = draw_sample(items, locator, cfg, step, rng)
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tseed)           # dropout masks
            loss, parts = objective.loss(model, item, center, action)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rec = {"step": step, "scan": Path(item.path).name, "action": action,
               "center": [int(c) for c in center], **parts, "seconds": time.perf_counter() - t0}
        records.append(rec)
        if bar is not None:
            bar.set_postfix(loss=f"{parts['loss']:.4f}", recon=f"{parts['recon']:.4f}",
                            pert=f"{parts['pert_rms_hu']:.0f}HU")
        if on_step is not None:
            on_step(step + 1, records)
    if bar is not None:
        bar.close()
    return records


def curve_summary(history: list[dict], parts: int = 5) -> list[dict]:
    """Mean loss, recon, perturbation RMS and seconds over `parts` consecutive chunks of steps."""
    out = []
    n = len(history)
    for i in range(min(parts, n)):
        chunk = history[i * n // parts:(i + 1) * n // parts] if n >= parts else history[i:i + 1]
        if not chunk:
            continue
        out.append({"steps": f"{chunk[0]['step']}-{chunk[-1]['step']}",
                    **{k: float(np.mean([r[k] for r in chunk]))
                       for k in ("loss", "recon", "perturb", "pert_rms_hu", "seconds")}})
    return out


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    d = TafimConfig()
    p = CliParser(prog="python -m procedures.baselines.tafim", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=d.data, help=f"folder of scans (default {d.data})")
    p.add_argument("--models", default=d.models, help="CT-GAN models folder with INJ/ and REM/")
    p.add_argument("--out", default="runs/tafim", help="output folder (default runs/tafim)")
    p.add_argument("--steps", type=int, default=1000, help="training steps (tamper samples), total")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop after this many minutes of training and save (0 = no limit)")
    p.add_argument("--width", type=int, default=d.width, help=f"U-Net filters ngf (default {d.width}, as TAFIM)")
    p.add_argument("--depth", type=int, default=d.depth, help=f"U-Net down-convolutions (default {d.depth})")
    p.add_argument("--slab", type=int, default=d.slab, help=f"slices per image (default {d.slab})")
    p.add_argument("--noise-size", type=int, default=d.noise_size, help="side of the global noise tensor")
    p.add_argument("--no-dropout", action="store_true", help="no pix2pix dropout")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr:g})")
    p.add_argument("--perturb-weight", type=float, default=d.perturb_weight,
                   help=f"weight of MSE(protected, x) (default {d.perturb_weight:g})")
    p.add_argument("--target", default=d.target,
                   help="uniform target: a value in [-1, 1] (normalised units, default 0), "
                        "a HU value like -850hu, or 'lung' (mean lung HU of the scan)")
    p.add_argument("--no-global-term", action="store_true",
                   help="drop the published loss on the global noise alone (halves CT-GAN calls)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    return p



def _write_summary(out: Path, cfg: TafimConfig, history: list, start: int, done: int, wall: float,
                   device: str, n_params: int) -> None:
    """summary.json and history.json of a TAFIM run, and the loss curve on the console."""
    curve = curve_summary(history)
    secs = [r["seconds"] for r in history[len(history) - (done - start):]] if done > start else []
    summary = {"config": asdict(cfg), "steps_done": done, "steps_this_run": done - start,
               "wall_seconds_this_run": wall,
               "seconds_per_step": float(np.mean(secs)) if secs else None,
               "seconds_per_step_median": float(np.median(secs)) if secs else None,
               "curve": curve, "device": device, "parameters": n_params}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "history.json", json.dumps(history, indent=0) + "\n")
    for c in curve:
        print(f"  steps {c['steps']}: loss {c['loss']:.4f}  recon {c['recon']:.4f}  "
              f"perturb {c['perturb']:.2e} ({c['pert_rms_hu']:.1f} HU RMS)  {c['seconds']:.2f} s/step")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if args.steps < 1 or args.ckpt_every < 1 or args.max_minutes < 0 or args.seed < 0:
        raise UsageError("--steps and --ckpt-every must be >= 1, --max-minutes and --seed >= 0")
    cfg = TafimConfig(slab=args.slab, width=args.width, depth=args.depth, dropout=not args.no_dropout,
                      noise_size=args.noise_size, perturb_weight=args.perturb_weight, lr=args.lr,
                      target=args.target, global_term=not args.no_global_term, seed=args.seed,
                      data=args.data, models=args.models).validate()
    device = pick_device(args.device)
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"

    # Everything that can fail cheaply fails before training.
    data = ScanDataset(args.data)
    items = [data[i] for i in range(len(data))]
    for it in items:
        if it.volume.shape[0] < cfg.slab:
            raise InputFileError(f"{it.path}: {it.volume.shape[0]} slices, fewer than a slab of {cfg.slab}")
    objective = TafimObjective.from_model_dirs(args.models, cfg, device)
    state = read_checkpoint(ckpt_path) if args.resume else None
    if state is not None:
        saved = TafimConfig.from_dict(state["config"], str(ckpt_path))
        diff = [k for k in TafimConfig.ARCH if getattr(saved, k) != getattr(cfg, k)]
        if diff:
            raise UsageError(f"{ckpt_path}: saved with another network ({', '.join(f'{k}={getattr(saved, k)}' for k in diff)})")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history: list[dict] = []
    start = 0
    if state is not None:
        load_state_into(model, state["model"], ckpt_path, "TAFIM model")
        if state.get("optimizer"):
            load_state_into(optimizer, state["optimizer"], ckpt_path, "optimiser state")
        start, history = int(state["step"]), list(state.get("history") or [])
    locator = make_locator(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"TAFIM: {len(items)} scan(s) from {args.data}, CT-GAN from {args.models}, U-Net width "
          f"{cfg.width} depth {cfg.depth} slab {cfg.slab} ({n_params / 1e6:.2f} M parameters incl. "
          f"global noise), target {cfg.target}, global term {'on' if cfg.global_term else 'off'}, "
          f"device {device}, steps {start}..{args.steps}")

    def save(step: int) -> None:
        save_checkpoint(ckpt_path, checkpoint_state(model, cfg, step, optimizer, history))

    def on_step(step: int, records: list) -> None:
        history.append(records[-1])
        if step % args.ckpt_every == 0:
            save(step)

    deadline = time.monotonic() + 60.0 * args.max_minutes if args.max_minutes else None
    t0 = time.perf_counter()
    train_steps(model, objective, optimizer, items, locator, cfg, start, args.steps,
                progress=None if args.no_progress else tqdm, deadline=deadline, on_step=on_step)
    wall = time.perf_counter() - t0
    done = history[-1]["step"] + 1 if history else start
    save(done)
    _write_summary(out, cfg, history, start, done, wall, str(device), n_params)
    print(f"wrote {ckpt_path} (step {done}), {out / 'summary.json'}, {out / 'history.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
