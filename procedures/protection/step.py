"""One MITS-GAN training step (docs/training.md#one-step); train.py runs it in a loop.

  D step:    L_D = BCE(D(x), 1) + BCE(D(detach(x_p)), 0)                (D_real + D_fake)
  attacker:  disruption = run.disruption.loss(slab), or None: MSE(x_p, T) to the black-box
             target T = CT-GAN(x_p) (published), or the white-box change of CT-GAN's output
  G step:    L_G = BCE(D(x_p), 1) - lambda * disruption + w * MSE(x_p, x)
             (G_adv, G_disrupt, G_fidelity)
each the mean over the step's slabs. Every slab is its own forward pass, so BatchNorm sees one
slab, as published. All random draws of a slab derive from (seed, step, stream) (`step_rng`).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from discriminator import build_discriminator
from generator import build_generator
from procedures.attacker.interface import Disruption, Slab
from procedures.protection.apply import eps_scale
from procedures.protection.disruption import DisruptionTarget
from procedures.protection.whitebox import WhiteboxDisruption

# The losses logged by name (as pix2pix's loss_names) to TensorBoard (loss/<name>) and summary.json.
LOSS_NAMES = ("D_real", "D_fake", "G_adv", "G_disrupt", "G_fidelity")


def step_rng(seed: int, step: int, stream: int = 0) -> tuple[np.random.Generator, torch.Generator]:
    """All randomness of one slab (tamper position, noise delta) derives from (seed, step, stream):
    resuming at any step, or running on another number of ranks, gives the same draws."""
    ss = np.random.SeedSequence([seed, step, stream])
    gen = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] % 2**63))
    return np.random.default_rng(ss), gen


# --- networks, optimisers, attacker: everything a step needs --------------------------------------
@dataclass
class Run:
    cfg: object
    device: torch.device
    dtype: torch.dtype
    G_raw: nn.Module              # the plain modules: state dicts, eval, export
    D_raw: nn.Module
    G: nn.Module                  # what the step calls: compiled and/or DDP-wrapped
    D: nn.Module
    D_plain: nn.Module            # D without DDP, for the G step (D's weights are frozen there)
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    bce: nn.Module
    disruption: Disruption        # the attacker as training sees it (black or white box)
    world: int = 1

    def autocast(self):
        if self.cfg.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def build_run(cfg, size: int, device: torch.device, dtype: torch.dtype, world: int = 1,
              disruption: Disruption | None = None) -> Run:
    """Networks (for slices of `size`), optimisers and the attacker (`disruption`, by default
    cfg.attack_mode's)."""
    G_raw = build_generator(cfg).to(device=device, dtype=dtype)
    D_raw = build_discriminator(cfg, size).to(device=device, dtype=dtype)
    if cfg.channels_last:
        G_raw, D_raw = (m.to(memory_format=torch.channels_last) for m in (G_raw, D_raw))
    opt_G = torch.optim.Adam(G_raw.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    opt_D = torch.optim.Adam(D_raw.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    G, D = (torch.compile(m) for m in (G_raw, D_raw)) if cfg.compile else (G_raw, D_raw)
    D_plain = D
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        G, D = DDP(G, device_ids=ids), DDP(D, device_ids=ids)
    # Published D ends in a sigmoid (BCELoss); ours outputs logits (BCEWithLogitsLoss).
    bce = nn.BCELoss() if getattr(D_raw, "sigmoid_head", False) else nn.BCEWithLogitsLoss()
    if disruption is None and cfg.attack_mode == "whitebox":
        disruption = WhiteboxDisruption(cfg, device)
    elif disruption is None:
        disruption = DisruptionTarget(cfg)
    return Run(cfg, device, dtype, G_raw, D_raw, G, D, D_plain, opt_G, opt_D, bce, disruption,
               world)


class Entry(NamedTuple):
    """One slab of a step: stream j's sub-batch k (first slice s) of a loaded volume."""
    stream: int
    item: object                  # scanDataset.VolumeItem
    k: int
    s: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # honest per-phase timings
        torch.cuda.synchronize(device)


def _slab_inputs(run: Run, item, starts: list[int], gen) -> tuple[torch.Tensor, torch.Tensor]:
    """G's inputs for the slabs at `starts`: real slices (n, S, H, W) and noise deltas, each slab's
    drawn from its own generator (gen(): one per slab, in order), on the run's device and format."""
    xs, ds = [], []
    for s in starts:
        x = item.volume[s:s + run.cfg.slab].unsqueeze(0)
        xs.append(x)
        ds.append(torch.rand(x.shape, generator=gen(), dtype=run.dtype))
    x, delta = torch.cat(xs), torch.cat(ds)
    x, delta = x.to(run.device, non_blocking=True), delta.to(run.device, non_blocking=True)
    if run.cfg.channels_last:
        cl = torch.channels_last
        x, delta = x.contiguous(memory_format=cl), delta.contiguous(memory_format=cl)
    return x, delta


def _per_sample_norms(G: nn.Module) -> bool:
    """True when a batch of slabs through G equals each slab on its own (no BatchNorm)."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in G.modules())


def _slab_protector(run: Run, sl: Slab):
    """starts -> G's protected slabs (n, S, H, W) of sl's volume, with grad, each one's noise drawn
    from sl's rng (in start order): the white-box cube protects every slab it touches. One
    batched G call where G has no BatchNorm (the U-Net: GroupNorm is per sample), else one a
    slab."""
    batched = _per_sample_norms(run.G_raw)
    scale = eps_scale(run.cfg, sl.item)

    def protect(starts: list[int]) -> torch.Tensor:
        gen = lambda: torch.Generator().manual_seed(int(sl.rng.integers(2 ** 63)))  # noqa: E731
        x, delta = _slab_inputs(run, sl.item, starts, gen)
        with run.autocast():
            if batched:
                return run.G(x, delta, scale=scale)
            return torch.cat([run.G(x[i:i + 1], delta[i:i + 1], scale=scale)
                              for i in range(len(starts))])
    return protect


def _new_slab(run: Run, e: Entry, step: int, seed: int) -> Slab:
    rng, gen = step_rng(seed, step, e.stream)
    x, delta = _slab_inputs(run, e.item, [e.s], lambda: gen)
    sl = Slab(e.stream, e.item, e.k, e.s, rng, x, delta)
    sl.protect = _slab_protector(run, sl)
    return sl


def _d_step(run: Run, slabs: list[Slab], share: float) -> dict[str, float]:
    """L_D = BCE(D(x), 1) + BCE(D(detach(x_p)), 0), each slab its own forward (as published).
    Computes every slab's x_p (kept, with grad, for the attacker and the G step)."""
    loss_D, parts = 0.0, {"D_real": [], "D_fake": []}
    for sl in slabs:
        with run.autocast():
            sl.x_p = run.G(sl.x, sl.delta, scale=eps_scale(run.cfg, sl.item))
            d_real, d_fake = run.D(sl.x), run.D(sl.x_p.detach())
            real = run.bce(d_real, torch.ones_like(d_real))
            fake = run.bce(d_fake, torch.zeros_like(d_fake))
            loss_D = loss_D + share * (real + fake)
        parts["D_real"].append(real.item())
        parts["D_fake"].append(fake.item())
    run.opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    run.opt_D.step()
    return {"D": loss_D.item(), **{k: float(np.mean(v)) for k, v in parts.items()}}


def _g_step(run: Run, slabs: list[Slab], disruption: list, share: float) -> dict[str, float]:
    """L_G = BCE(D(x_p), 1) - lambda * disruption + w * MSE(x_p, x). D's own module (not DDP's):
    its weights are frozen here, so DDP must not expect their gradients."""
    cfg = run.cfg
    run.D_raw.requires_grad_(False)
    loss_G, parts = 0.0, {"G_adv": [], "G_disrupt": [], "G_fidelity": []}
    for sl, dis in zip(slabs, disruption):
        with run.autocast():
            d_fake = run.D_plain(sl.x_p)
            adv = run.bce(d_fake, torch.ones_like(d_fake))
        loss = adv
        if dis is not None:
            loss = loss - cfg.lambda_disrupt * dis
            parts["G_disrupt"].append(dis.item())
        if cfg.fidelity_weight:
            fid = nn.functional.mse_loss(sl.x_p, sl.x)
            loss = loss + cfg.fidelity_weight * fid
        else:  # logged only
            fid = nn.functional.mse_loss(sl.x_p.detach().float(), sl.x.float())
        loss_G = loss_G + share * loss
        parts["G_adv"].append(adv.item())
        parts["G_fidelity"].append(fid.item())
    run.opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    run.opt_G.step()
    run.D_raw.requires_grad_(True)
    return {"G": loss_G.item(), **{k: float(np.mean(v)) for k, v in parts.items() if v}}


def train_step(run: Run, entries, step: int, seed: int) -> tuple[dict, list[Slab]]:
    """One optimisation step on this rank's slabs `entries` = [Entry(stream, item, k, s)].
    Returns (scalars for logging: the named losses, incl. time/gd_s and time/attack_s; the
    slabs)."""
    cfg, dev = run.cfg, run.device
    # every slab weighs 1/batch in the step's loss; DDP averages ranks
    share = run.world / cfg.batch
    slabs = [_new_slab(run, Entry(*e), step, seed) for e in entries]
    run.G.train(); run.D.train()
    _sync(dev)
    t0 = time.perf_counter()
    losses = _d_step(run, slabs, share)
    _sync(dev)
    t_gd = time.perf_counter() - t0

    # Disruption through the frozen CT-GAN: the black box returns MSE to a constant target (as
    # published), the white box CT-GAN's output change, differentiable.
    t1 = time.perf_counter()
    disruption = [run.disruption.loss(sl) for sl in slabs]
    _sync(dev)
    t_attack = time.perf_counter() - t1

    t2 = time.perf_counter()
    losses |= _g_step(run, slabs, disruption, share)
    _sync(dev)
    t_gd += time.perf_counter() - t2

    with torch.no_grad():
        pert_hu = torch.cat([((sl.x_p - sl.x).abs() * (sl.item.hu_max - sl.item.hu_min) / 2.0)
                             .float().flatten()
                             for sl in slabs])
    scale = cfg.batch / run.world / len(slabs)  # the weighted sums as means over this rank's slabs
    scalars = {"loss/D": losses.pop("D") * scale, "loss/G": losses.pop("G") * scale}
    scalars |= {f"loss/{k}": v for k, v in losses.items()}
    scalars |= {"perturbation/rms_hu": pert_hu.pow(2).mean().sqrt().item(),
                "perturbation/max_hu": pert_hu.max().item(),
                "time/gd_s": t_gd, "time/attack_s": t_attack,
                "disruption/computed": run.disruption.stats.computed}
    return scalars, slabs
