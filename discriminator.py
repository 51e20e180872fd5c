"""MITS-GAN discriminators. Input: a slab (B, S, H, W) in [-1, 1].

- PublishedDiscriminator: the published D, per slice: convs 1-1-2-4-8-8-8-8-1 (ndf = 1),
  seven k4 s2 p1 convs then k4 s1 p0, BatchNorm on convs 2-7, LeakyReLU 0.2: one value per
  512x512 slice. For other slice sizes the number of strided convs adapts (log2(size) - 2),
  so the last conv still sees 4x4. Returns logits (B*S,) or, with sigmoid_head, probabilities
  (`d_sigmoid`: the published sigmoid + BCELoss). The published convs have no bias
  (`d_bias false`); ours keep PyTorch's default bias (docs/fidelity.md).
- PatchDiscriminator: pix2pix's 70x70 PatchGAN on the slab (slices as channels): a map of
  logits, one per overlapping patch; sees inter-slice consistency.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from generator import init_weights


class PublishedDiscriminator(nn.Module):

    def __init__(
        self, ndf: int = 1, size: int = 512, sigmoid_head: bool = False, bias: bool = True
    ):
        super().__init__()
        n_strided = max(1, int(math.log2(max(size, 8))) - 2)  # 512 -> 7
        mults = [1, 2, 4] + [8] * max(0, n_strided - 3)
        mults = mults[:n_strided]
        layers: list[nn.Module] = []
        cin = 1
        for i, m in enumerate(mults):
            cout = ndf * m
            layers.append(nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=bias))
            if i > 0:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 4, stride=1, padding=0, bias=bias))
        self.net = nn.Sequential(*layers)
        self.sigmoid_head = sigmoid_head
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h, w = x.shape
        out = self.net(x.reshape(b * s, 1, h, w)).mean(dim=(1, 2, 3))  # (B*S,), 1x1 at 2^k sizes
        return torch.sigmoid(out) if self.sigmoid_head else out


class PatchDiscriminator(nn.Module):
    def __init__(self, slab: int = 4, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(slab, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.sigmoid_head = False
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_discriminator(cfg, size: int) -> nn.Module:
    if cfg.discriminator == "published":
        return PublishedDiscriminator(ndf=cfg.d_width, size=size, sigmoid_head=cfg.d_sigmoid,
                                      bias=cfg.d_bias)
    if cfg.discriminator == "patch":
        return PatchDiscriminator(slab=cfg.slab, ndf=cfg.d_width)
    raise ValueError(f"unknown discriminator {cfg.discriminator!r}")
