"""The attacker's interface: what the protection code may ask of CT-GAN (docs/attack.md).

Three implementations of CT-GAN tamper a scan the same way (docs/attack.md#overview):
procedures.attacker.pipeline.ScanManipulator (Keras and NumPy, the published arithmetic),
procedures.attacker.torch_attacker.TorchScanManipulator (the same in torch, on the device) and
procedures.attacker.port.DifferentiableTamper (the differentiable PyTorch port, steps 1-7).
Each is an `Attacker`.

Training sees the attacker through a `Disruption` (docs/training.md#one-step): the black-box
procedures.protection.disruption.DisruptionTarget or the white-box
procedures.protection.whitebox.WhiteboxDisruption. `train_step` hands each a `Slab` and gets the
disruption term back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # annotations only: this module imports no torch (fast --help of the CLIs)
    import torch

    from procedures.protection.disruption import DisruptionStats
    from scanDataset import VolumeItem

Action = Literal["inject", "remove"]


@runtime_checkable
class Attacker(Protocol):
    """CT-GAN: inject or remove a nodule at one voxel of a float HU volume (z, y, x)."""

    def tamper_volume(self, vol, spacing, coord_vox, action: Action = "inject",
                      rng: np.random.Generator | None = None) -> tuple[slice, slice, slice]:
        """Tamper `vol` in place at `coord_vox`; the slices of what may have changed."""


@dataclass
class Slab:
    """One sub-batch of a training step, as a Disruption sees it (train_step builds it)."""
    stream: int
    item: VolumeItem
    k: int                        # sub-batch index in its volume (even: inject, odd: remove)
    s: int                        # first slice
    rng: np.random.Generator      # this slab's draws (location, noise of other slabs)
    x: torch.Tensor               # (1, S, H, W) real slices in [-1, 1]
    delta: torch.Tensor           # noise input of G
    x_p: torch.Tensor | None = None                 # G's protected slab, with grad
    # starts -> G's protected slabs (n, S, H, W) at those first slices, with grad and noise drawn
    # from rng: the white-box cube protects every slab it touches, as protect.py does
    protect: Callable[[list[int]], torch.Tensor] | None = None
    tampered: np.ndarray | None = None              # black-box T (for the sample grid)


@runtime_checkable
class Disruption(Protocol):
    """The attacker as training uses it: the disruption term of one slab, counted in `stats`."""

    stats: DisruptionStats

    def loss(self, slab: Slab) -> torch.Tensor | None:
        """The slab's disruption term (a scalar tensor, with grad in x_p where the attacker is
        differentiable), or None when the slab gets no term (ineligible, attacker error)."""
