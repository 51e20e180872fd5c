"""TAFIM's protection network, its configuration and checkpoints (Aneja et al., ECCV 2022;
the CT adaptation is described in procedures/baselines/tafim.py and docs/results.md).

Imports only PyTorch and the project's utils: loading a checkpoint needs neither the attacker
nor the evaluation harness.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.checkpoint import load_state_into, torch_load_weights
from utils.errors import ModelFileError, UsageError

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
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(self, name)}")
        if self.depth < 2:
            raise UsageError("--depth must be >= 2 (a U-Net needs an inner block), "
                             f"got {self.depth}")
        if not self.lr > 0 or self.perturb_weight < 0:
            raise UsageError("--lr must be > 0 and --perturb-weight >= 0")
        parse_target(self.target)
        return self

    @classmethod
    def from_dict(cls, d: dict, source: str = "checkpoint") -> "TafimConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ModelFileError(f"{source}: not a TAFIM config "
                                 f"(unknown fields {', '.join(unknown)})")
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
        self.down_norm = nn.ModuleList([nn.InstanceNorm2d(ch[i]) if 0 < i < depth - 1
                                        else nn.Identity() for i in range(depth)])
        self.up_norm = nn.ModuleList([nn.InstanceNorm2d(ch[i - 1]) if i > 0 else nn.Identity()
                                      for i in range(depth)])
        self.up_drop = nn.ModuleList([nn.Dropout(0.5) if dropout and 4 <= i <= depth - 2
                                      else nn.Identity() for i in range(depth)])
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
        kind = state.get("kind") if isinstance(state, dict) else None
        raise ModelFileError(f"{path}: not a TAFIM checkpoint (kind {kind!r})")
    return state


def load_tafim(path, device="cpu") -> tuple[TafimUNet, TafimConfig, dict]:
    """(model in eval mode on `device`, its config, the whole checkpoint dict)."""
    state = read_checkpoint(path)
    cfg = TafimConfig.from_dict(state["config"], str(path))
    model = build_model(cfg)
    load_state_into(model, state["model"], path, "TAFIM model")
    return model.to(device).eval(), cfg, state
