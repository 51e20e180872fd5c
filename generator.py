"""MITS-GAN generators. Both map a slab of slices (B, S, H, W) in [-1, 1] to its protected
version, same shape, and take the noise input delta (uniform [0, 1), drawn per forward pass).

- PublishedGenerator: the published generator (docs/fidelity.md), one slice at a time: a noise net on delta
  (1x1 convs 1-2-4-4-2-1, BN + ReLU) concatenated before x, conv 3x3 to 64 + ReLU, three
  residual blocks, conv 1x1 to 1 channel, tanh. No skip, no bound.
- UNetGenerator: the user's design card: a U-Net on slabs of consecutive slices that *adds* a
  learned perturbation: x_p = clamp(x + scale * tanh(r)), scale = eps (in normalised units)
  when a budget is set, else 1. Its last conv starts at zero, so training starts from x_p = x.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def init_weights(m: nn.Module) -> None:
    """DCGAN init used by the published code: conv ~ N(0, 0.02); BN gamma ~ N(1, 0.02), beta 0.
    Conv biases keep PyTorch's default init, as published."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def draw_delta(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform [0, 1) noise like x (the published code uses torch.rand; the paper says Gaussian)."""
    return torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)


class NoiseNet(nn.Module):
    def __init__(self, channels=(1, 2, 4, 4, 2, 1)):
        super().__init__()
        layers = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            layers += [
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
        self.net = nn.Sequential(*layers)

    def forward(self, delta):
        return self.net(delta)


class ResidualBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
            nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x):
        # No ReLU after the sum, as published.
        return x + self.body(x)


class PublishedGenerator(nn.Module):
    def __init__(self, width: int = 64, blocks: int = 3):
        super().__init__()
        self.noise = NoiseNet()
        self.head = nn.Sequential(nn.Conv2d(2, width, 3, padding=1), nn.ReLU(inplace=True))
        self.trunk = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.tail = nn.Conv2d(width, 1, 1)
        self.apply(init_weights)

    def forward(
        self, x: torch.Tensor, delta: torch.Tensor | None = None, scale=None
    ) -> torch.Tensor:
        b, s, h, w = x.shape
        xs = x.reshape(b * s, 1, h, w)
        delta = draw_delta(xs) if delta is None else delta.reshape(b * s, 1, h, w)
        # N(delta) is concatenated *before* x, as published.
        z = torch.cat([self.noise(delta), xs], dim=1)
        out = torch.tanh(self.tail(self.trunk(self.head(z))))
        return out.reshape(b, s, h, w)


def _block(cin: int, cout: int) -> nn.Sequential:
    groups = min(8, cout)
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(groups, cout),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(groups, cout),
        nn.LeakyReLU(0.2, inplace=True),
    )


class UNetGenerator(nn.Module):
    """2-D U-Net over a slab: the S slices (and S noise maps) are channels, so the perturbation
    of each slice sees its neighbours. GroupNorm, not BatchNorm: a batch is one slab, and
    protection at export time must behave as in training."""

    def __init__(self, slab: int = 4, width: int = 32, depth: int = 4, out_init_std: float = 0.0):
        super().__init__()
        self.slab, self.depth = slab, depth
        chans = [width * min(2 ** i, 8) for i in range(depth + 1)]
        self.enc = nn.ModuleList([_block(2 * slab, chans[0])])
        self.down = nn.ModuleList()
        for i in range(depth):
            self.down.append(nn.Conv2d(chans[i], chans[i], 4, stride=2, padding=1))
            self.enc.append(_block(chans[i], chans[i + 1]))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(depth)):
            self.up.append(nn.Conv2d(chans[i + 1], chans[i], 3, padding=1))
            self.dec.append(_block(2 * chans[i], chans[i]))
        self.out = nn.Conv2d(chans[0], slab, 1)
        self.apply(init_weights)
        # Unbounded: start at the identity (protected == real). Bounded: start at a few percent
        # of eps, because the white-box disruption has zero gradient at x_p == x and int16
        # rounding erases a perturbation below 0.5 HU (the optimiser would never leave 0).
        if out_init_std:
            nn.init.normal_(self.out.weight, 0.0, out_init_std)
        else:
            nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def perturbation(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """tanh(r) in [-1, 1], shape of x."""
        b, s, h, w = x.shape
        if s != self.slab:
            raise ValueError(f"U-Net built for slabs of {self.slab} slices, got {s}")
        delta = draw_delta(x) if delta is None else delta
        m = 2 ** self.depth
        ph, pw = (-h) % m, (-w) % m
        z = torch.cat([x, delta], dim=1)
        if ph or pw:  # any slice size: pad to a multiple of 2^depth, crop back
            z = F.pad(z, (0, pw, 0, ph), mode="replicate")
        skips = []
        z = self.enc[0](z)
        for down, enc in zip(self.down, self.enc[1:]):
            skips.append(z)
            z = enc(down(z))
        for up, dec in zip(self.up, self.dec):
            skip = skips.pop()
            z = up(F.interpolate(z, size=skip.shape[-2:], mode="nearest"))
            z = dec(torch.cat([z, skip], dim=1))
        return torch.tanh(self.out(z))[..., :h, :w]

    def forward(
        self, x: torch.Tensor, delta: torch.Tensor | None = None, scale=None
    ) -> torch.Tensor:
        """scale: perturbation bound in normalised units, a float or a (B,) tensor; None = 1."""
        p = self.perturbation(x, delta)
        if scale is None:
            scale = 1.0
        elif torch.is_tensor(scale):
            scale = scale.reshape(-1, 1, 1, 1).to(x)
        return torch.clamp(x + scale * p, -1.0, 1.0)


def build_generator(cfg) -> nn.Module:
    if cfg.generator == "published":
        return PublishedGenerator(width=cfg.g_width, blocks=cfg.g_blocks)
    if cfg.generator == "unet":
        return UNetGenerator(
            slab=cfg.slab, width=cfg.g_width, out_init_std=0.1 if cfg.eps_hu > 0 else 0.0
        )
    raise ValueError(f"unknown generator {cfg.generator!r}")
