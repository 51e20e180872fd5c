"""Train MITS-GAN: a generator that protects CT slices against CT-GAN tampering.

    python train.py --preset demo                # small, CPU, minutes
    python train.py --preset paper               # published architecture and settings
    python train.py --preset reference           # the published code's behaviour, quirks included
    python train.py --preset demo --resume auto  # continue from runs/demo/checkpoint.pt

One step = one sub-batch of `slab` consecutive slices of one volume (SPEC.md section 5):
  D step:  L_D = BCE(D(x), 1) + BCE(D(detach(x_p)), 0)
  G step:  L_G = BCE(D(x_p), 1) - lambda * MSE(x_p, T),  T = CT-GAN(x_p) (frozen, black box)
Outputs in out_dir: config.json, checkpoint.pt, samples/*.png, tb/ (TensorBoard), summary.json
and, with --save_img_result true, protected/*.mhd in HU with the source geometry.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
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


def schedule(cfg, n_volumes: int, depths: list[int], seed: int) -> list[tuple[int, int, int, int]]:
    """Every step of the run as (epoch, volume, sub-batch index, first slice). Volume order is
    shuffled per epoch from (seed, epoch), so a resumed run replays the same order. The last
    depth % slab slices of a volume are not trained on (as published)."""
    steps = []
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n_volumes)
        for v in order:
            for k in range(depths[v] // cfg.slab):
                steps.append((epoch, int(v), k, k * cfg.slab))
    return steps


def step_rng(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """All randomness of one step (tamper position, noise delta) derives from (seed, step):
    resuming at any step continues exactly as an uninterrupted run."""
    return np.random.default_rng([seed, step]), torch.Generator().manual_seed(seed * 1_000_003 + step)


def main(argv=None) -> int:
    given = config_mod.given_flags(argv, description=__doc__)
    cfg = config_mod.make_config(given.pop("preset", "paper"), **given)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(cfg.out_dir)
    resume = out / "checkpoint.pt" if cfg.resume == "auto" else (Path(cfg.resume) if cfg.resume else None)
    state = None
    if resume is not None and (cfg.resume != "auto" or resume.exists()):
        state = load_checkpoint(resume)
        saved = config_mod.load_config_dict(state["config"])
        # The run's identity comes from the checkpoint; only where/how long it runs may change.
        for name in config_mod.RESUMABLE_OVERRIDES:
            if name in given or name in ("out_dir", "resume"):
                setattr(saved, name, getattr(cfg, name))
        cfg = saved
    seed = cfg.seed if cfg.seed >= 0 else int(np.random.SeedSequence().entropy % 2**31)
    torch.manual_seed(seed)
    device = pick_device(cfg.device)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    (out / "samples").mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.json")

    # --- data, networks, optimisers, attacker ---------------------------------------------------
    data = ScanDataset(cfg.data_dir, dtype=dtype, mhd_only=cfg.preset == "reference")
    items = [data[i] for i in range(len(data))]  # held in memory for the whole run
    depths = [it.volume.shape[0] for it in items]
    if min(depths) < cfg.slab:
        raise UsageError(f"a volume has {min(depths)} slices, fewer than --slab {cfg.slab}")
    size = min(min(it.volume.shape[1:]) for it in items)
    G = build_generator(cfg).to(device=device, dtype=dtype)
    D = build_discriminator(cfg, size).to(device=device, dtype=dtype)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    # Published D ends in a sigmoid (BCELoss); ours outputs logits (BCEWithLogitsLoss).
    bce = nn.BCELoss() if getattr(D, "sigmoid_head", False) else nn.BCEWithLogitsLoss()
    mse = nn.MSELoss()
    if cfg.attack_mode == "whitebox":
        from procedures.whitebox import WhiteboxDisruption
        target = WhiteboxDisruption(cfg, device)
    else:
        target = DisruptionTarget(cfg)
    start = 0
    if state is not None:
        G.load_state_dict(state["generator"])
        D.load_state_dict(state["discriminator"])
        opt_G.load_state_dict(state["opt_G"])
        opt_D.load_state_dict(state["opt_D"])
        target.stats = DisruptionStats.from_dict(state["disruption"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        log.info("resumed from %s at step %d", resume, start)

    steps = schedule(cfg, len(items), depths, seed)
    if cfg.max_steps:
        steps = steps[: cfg.max_steps]
    writer = _tensorboard(out / "tb")
    timing = {"gd": [], "attack": []}  # seconds per step of this run (bench.py drops warm-up)

    def checkpoint(step: int) -> None:
        save_checkpoint(out / "checkpoint.pt", {
            "generator": G.state_dict(), "discriminator": D.state_dict(),
            "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
            "step": step, "config": cfg.to_dict() | {"seed": seed},
            "disruption": target.stats.as_dict(), "torch_rng": torch.get_rng_state()})

    # --- the loop ---------------------------------------------------------------------------------
    bar = tqdm(range(start, len(steps)), total=len(steps), initial=start, disable=not cfg.progress,
               desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        epoch, v, k, s = steps[step]
        item = items[v]
        rng, gen = step_rng(seed, step)
        x = item.volume[s:s + cfg.slab].unsqueeze(0).to(device)          # (1, S, H, W)
        delta = torch.rand(x.shape, generator=gen, dtype=dtype).to(device)
        scale = eps_scale(cfg, item)
        G.train(); D.train()
        t0 = time.perf_counter()

        # D step: real -> 1, protected (detached) -> 0.
        x_p = G(x, delta, scale=scale)
        d_real, d_fake = D(x), D(x_p.detach())
        loss_D = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        opt_D.step()
        t_gd = time.perf_counter() - t0

        # Disruption through the frozen CT-GAN: black box = a constant target T (NumPy, no
        # gradient, as published); white box = CT-GAN's output change, differentiable.
        t1 = time.perf_counter()
        T = None
        if cfg.attack_mode == "whitebox":
            disruption = target.loss(item, s, x_p, k, rng)
        else:
            T = target.target(item, s, x_p.detach()[0].double().cpu().numpy(), k, rng)
            disruption = None if T is None else mse(x_p, torch.from_numpy(T).to(x_p).unsqueeze(0))
        t_attack = time.perf_counter() - t1

        # G step: fool D, and push CT-GAN's result away (L_G = adv - lambda * disruption).
        t2 = time.perf_counter()
        for p in D.parameters():
            p.requires_grad_(False)
        d_fake = D(x_p)
        loss_adv = bce(d_fake, torch.ones_like(d_fake))
        loss_G = loss_adv
        if disruption is not None:
            loss_G = loss_G - cfg.lambda_disrupt * disruption
        if cfg.fidelity_weight:
            loss_G = loss_G + cfg.fidelity_weight * mse(x_p, x)
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        for p in D.parameters():
            p.requires_grad_(True)
        t_gd += time.perf_counter() - t2
        timing["gd"].append(t_gd)
        timing["attack"].append(t_attack)

        # --- logging, samples, checkpoints ---
        with torch.no_grad():
            pert_hu = (x_p - x).abs() * (item.hu_max - item.hu_min) / 2.0
        scalars = {"loss/D": loss_D.item(), "loss/G_adv": loss_adv.item(), "loss/G": loss_G.item(),
                   "perturbation/rms_hu": pert_hu.pow(2).mean().sqrt().item(),
                   "perturbation/max_hu": pert_hu.max().item(),
                   "time/gd_s": t_gd, "time/attack_s": t_attack,
                   "disruption/computed": target.stats.computed}
        if disruption is not None:
            scalars["loss/disruption_mse"] = disruption.item()
        bar.set_postfix(D=f"{scalars['loss/D']:.3f}", G=f"{scalars['loss/G']:.3f}",
                        rms=f"{scalars['perturbation/rms_hu']:.1f}HU", T=target.stats.computed)
        if writer is not None and (step % cfg.log_every == 0 or step == len(steps) - 1):
            for name, val in scalars.items():
                writer.add_scalar(name, val, step)
        if cfg.sample_every and step % cfg.sample_every == 0:
            _sample_grid(out / "samples" / f"step{step:06d}.png", item, s, x, x_p, T, step)
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
            checkpoint(step + 1)
    bar.close()
    checkpoint(len(steps))

    # --- summary, warnings, exports ----------------------------------------------------------------
    n_run = max(len(steps) - start, 1)
    summary = {"steps": len(steps), "steps_this_run": len(steps) - start, "seed": seed,
               "device": str(device), "dtype": cfg.dtype,
               "seconds_per_step_gd": sum(timing["gd"]) / n_run,
               "seconds_per_step_attack": sum(timing["attack"]) / n_run,
               "step_seconds": timing,
               "disruption": target.stats.as_dict()}
    print(target.stats.summary())
    if steps and target.stats.computed == 0:
        # SPEC.md section 9: on short or thick-slice scans the published loop never gets the term.
        log.warning("no sub-batch got the disruption term: this run was pure adversarial "
                    "training (near_end_rule=%s, depths=%s, exact_resample=%s)",
                    cfg.near_end_rule, depths, cfg.exact_resample)
    if cfg.save_img_result:
        prog = tqdm if cfg.progress else None
        summary["exported"] = []
        for item in items:
            hu = protect_volume(G, item, cfg, device, dtype, seed=seed, progress=prog)
            paths = export_protected(item, hu, out / "protected")
            diff = hu - item.scan.hu
            summary["exported"].append({"source": item.path, "written": [str(p) for p in paths],
                                        "perturbation_rms_hu": float(np.sqrt(np.mean(diff ** 2))),
                                        "perturbation_max_hu": float(np.abs(diff).max())})
            print(f"protected {item.path} -> {paths[0]} (perturbation RMS "
                  f"{summary['exported'][-1]['perturbation_rms_hu']:.1f} HU)")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"G/D {summary['seconds_per_step_gd']:.3f} s/step, attacker "
          f"{summary['seconds_per_step_attack']:.3f} s/step on {device}; outputs in {out}")
    if writer is not None:
        writer.close()
    return 0


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in requirements.txt; degrade rather than fail
        log.warning("tensorboard not installed: no TensorBoard scalars")
        return None
    return SummaryWriter(str(path))


def _sample_grid(path, item, s, x, x_p, T, step) -> None:
    """[real | protected | tampered (CT-GAN of protected) | difference] in HU, one row a slice."""
    to_hu = item.to_hu
    real = to_hu(x[0].detach().double().cpu().numpy())
    prot = to_hu(x_p[0].detach().double().cpu().numpy())
    tamp = to_hu(T) if T is not None else None
    save_grid(path, {
        "real": list(real), "protected": list(prot),
        "tampered": list(tamp) if tamp is not None else [None] * len(real),
        "difference": list(prot - real)},
        title=f"{Path(item.path).name} slices {s}-{s + len(real) - 1}, step {step}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
