"""Train MITS-GAN: a generator that protects CT slices against CT-GAN tampering.

    python train.py --preset demo                # small, CPU, minutes
    python train.py --preset paper               # published architecture and settings
    python train.py --preset reference           # the published code's behaviour, quirks included
    python train.py --preset demo --resume auto  # continue from runs/demo/checkpoint.pt
    torchrun --nproc_per_node 4 train.py --preset default --batch 8 --amp bf16   # 4 GPUs, DDP

One step = `batch` sub-batches ("slabs") of `slab` consecutive slices (SPEC.md section 5: batch 1):
  D step:  L_D = BCE(D(x), 1) + BCE(D(detach(x_p)), 0)
  G step:  L_G = BCE(D(x_p), 1) - lambda * MSE(x_p, T),  T = CT-GAN(x_p) (frozen, black box)
each the mean over the step's slabs. Every slab is its own forward pass, so BatchNorm sees one
slab, as published. Slab j of a step comes from "stream" j: the volumes v with v % batch == j, in
that stream's own shuffled order; all its random draws derive from (seed, step, j).

Several processes (torchrun; DistributedDataParallel): rank r runs the streams j with
j % world == r, loads only their volumes and runs its own attacker; DDP averages the gradients.
Since each slab's loss is weighted 1/batch whatever rank runs it, the weights do not depend on the
number of ranks (tests/test_ddp.py). NCCL with one GPU per rank, gloo on CPU or when ranks share a
GPU. Only rank 0 writes checkpoints, logs and samples; each rank exports its own volumes.
Outputs in out_dir: config.json, checkpoint.pt, samples/*.png, tb/ (TensorBoard), summary.json
(with per-step seconds of G/D and of the attacker) and, with --save_img_result true,
protected/*.mhd in HU with the source geometry.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import config as config_mod
from discriminator import build_discriminator
from generator import build_generator
from procedures.disruption import DisruptionStats, DisruptionTarget
from procedures.protection import eps_scale, export_protected, protect_volume
from scanDataset import ScanDataset
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import UsageError, run_cli
from utils.images import save_grid

log = logging.getLogger("mitsgan.train")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def init_distributed(cfg) -> tuple[int, int, torch.device]:
    """(rank, world size, device). One process unless started by torchrun (WORLD_SIZE > 1):
    then one GPU per local rank over NCCL, or gloo on CPU / when more ranks than GPUs share them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(cfg.device)
    if world == 1:
        return 0, 1, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
        if int(os.environ.get("LOCAL_WORLD_SIZE", world)) <= torch.cuda.device_count():
            backend = "nccl"
    dist.init_process_group(backend)
    return rank, world, device


def schedule(cfg, volumes: list[int], depths: dict[int, int], seed: int, stream: int = 0):
    """Every step of one stream as (epoch, volume, sub-batch index, first slice). The stream's
    volume order is shuffled per epoch from (seed, stream, epoch), so a resumed run replays the
    same order. The last depth % slab slices of a volume are not trained on (as published)."""
    steps = []
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([seed, stream, epoch]).permutation(len(volumes))
        for i in order:
            v = volumes[i]
            for k in range(depths[v] // cfg.slab):
                steps.append((epoch, v, k, k * cfg.slab))
    return steps


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
    target: object                # DisruptionTarget (black box) or WhiteboxDisruption
    world: int = 1

    def autocast(self):
        if self.cfg.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def build_run(cfg, size: int, device: torch.device, dtype: torch.dtype, world: int = 1,
              target=None) -> Run:
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
    if target is None and cfg.attack_mode == "whitebox":
        from procedures.whitebox import WhiteboxDisruption
        target = WhiteboxDisruption(cfg, device)
    elif target is None:
        target = DisruptionTarget(cfg)
    return Run(cfg, device, dtype, G_raw, D_raw, G, D, D_plain, opt_G, opt_D, bce, target, world)


@dataclass
class Slab:
    stream: int
    item: object                  # scanDataset.VolumeItem
    k: int                        # sub-batch index in its volume (even: inject, odd: remove)
    s: int                        # first slice
    rng: np.random.Generator
    x: torch.Tensor               # (1, S, H, W) real slices in [-1, 1]
    delta: torch.Tensor           # noise input of G
    x_p: torch.Tensor | None = None
    T: np.ndarray | None = None   # black-box target (for the sample grid)
    disruption: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # honest per-phase timings
        torch.cuda.synchronize(device)


def train_step(run: Run, entries, step: int, seed: int) -> tuple[dict, list[Slab]]:
    """One optimisation step on this rank's slabs `entries` = [(stream, item, k, s)].
    Returns (scalars for logging, incl. time/gd_s and time/attack_s, the slabs)."""
    cfg, dev = run.cfg, run.device
    share = run.world / cfg.batch  # every slab weighs 1/batch in the step's loss; DDP averages ranks
    slabs = []
    for stream, item, k, s in entries:
        rng, gen = step_rng(seed, step, stream)
        x = item.volume[s:s + cfg.slab].unsqueeze(0)                      # (1, S, H, W)
        delta = torch.rand(x.shape, generator=gen, dtype=run.dtype)
        x, delta = x.to(dev, non_blocking=True), delta.to(dev, non_blocking=True)
        if cfg.channels_last:
            x, delta = x.contiguous(memory_format=torch.channels_last), delta.contiguous(memory_format=torch.channels_last)
        slabs.append(Slab(stream, item, k, s, rng, x, delta))
    run.G.train(); run.D.train()
    _sync(dev)
    t0 = time.perf_counter()

    # D step: real -> 1, protected (detached) -> 0.
    loss_D = 0.0
    for sl in slabs:
        with run.autocast():
            sl.x_p = run.G(sl.x, sl.delta, scale=eps_scale(cfg, sl.item))
            d_real, d_fake = run.D(sl.x), run.D(sl.x_p.detach())
            loss_D = loss_D + share * (run.bce(d_real, torch.ones_like(d_real))
                                       + run.bce(d_fake, torch.zeros_like(d_fake)))
    run.opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    run.opt_D.step()
    _sync(dev)
    t_gd = time.perf_counter() - t0

    # Disruption through the frozen CT-GAN: black box = a constant target T (NumPy, no
    # gradient, as published); white box = CT-GAN's output change, differentiable.
    t1 = time.perf_counter()
    for sl in slabs:
        if cfg.attack_mode == "whitebox":
            sl.disruption = run.target.loss(sl.item, sl.s, sl.x_p, sl.k, sl.rng)
        else:
            sl.T = run.target.target(sl.item, sl.s, sl.x_p.detach()[0].double().cpu().numpy(), sl.k, sl.rng)
            if sl.T is not None:
                T = torch.from_numpy(sl.T).to(device=dev, dtype=sl.x_p.dtype).unsqueeze(0)
                sl.disruption = nn.functional.mse_loss(sl.x_p, T)
    _sync(dev)
    t_attack = time.perf_counter() - t1

    # G step: fool D, and push CT-GAN's result away (L_G = adv - lambda * disruption). D's own
    # module (not DDP's): its weights are frozen here, so DDP must not expect their gradients.
    t2 = time.perf_counter()
    run.D_raw.requires_grad_(False)
    loss_G = loss_adv = 0.0
    for sl in slabs:
        with run.autocast():
            d_fake = run.D_plain(sl.x_p)
            adv = run.bce(d_fake, torch.ones_like(d_fake))
        loss = adv
        if sl.disruption is not None:
            loss = loss - cfg.lambda_disrupt * sl.disruption
        if cfg.fidelity_weight:
            loss = loss + cfg.fidelity_weight * nn.functional.mse_loss(sl.x_p, sl.x)
        loss_G, loss_adv = loss_G + share * loss, loss_adv + share * adv.detach()
    run.opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    run.opt_G.step()
    run.D_raw.requires_grad_(True)
    _sync(dev)
    t_gd += time.perf_counter() - t2

    # Scalars: means over this rank's slabs.
    with torch.no_grad():
        pert_hu = torch.stack([((sl.x_p - sl.x).abs() * (sl.item.hu_max - sl.item.hu_min) / 2.0).float()
                               for sl in slabs])
    scalars = {"loss/D": loss_D.item() * cfg.batch / run.world / len(slabs),
               "loss/G_adv": float(loss_adv) * cfg.batch / run.world / len(slabs),
               "loss/G": loss_G.item() * cfg.batch / run.world / len(slabs),
               "perturbation/rms_hu": pert_hu.pow(2).mean().sqrt().item(),
               "perturbation/max_hu": pert_hu.max().item(),
               "time/gd_s": t_gd, "time/attack_s": t_attack,
               "disruption/computed": run.target.stats.computed}
    got = [sl.disruption.item() for sl in slabs if sl.disruption is not None]
    if got:
        scalars["loss/disruption_mse"] = float(np.mean(got))
    return scalars, slabs
