"""Train MITS-GAN: a generator that protects CT slices against CT-GAN tampering.

    python train.py --preset demo                # small, CPU, minutes
    python train.py --preset paper               # published architecture and settings
    python train.py --preset reference           # the published code's behaviour, quirks included
    python train.py --preset demo --resume auto  # continue from runs/demo/checkpoint.pt
    torchrun --nproc_per_node 4 train.py --preset whitebox --batch 8 --amp bf16   # 4 GPUs, DDP

One step = `batch` sub-batches ("slabs") of `slab` consecutive slices (published: batch 1),
in procedures/protection/step.py `train_step` (docs/training.md#one-step):
  D step:    L_D = BCE(D(x), 1) + BCE(D(detach(x_p)), 0)                (D_real + D_fake)
  attacker:  disruption = run.disruption.loss(slab), or None (where the attack enters training)
  G step:    L_G = BCE(D(x_p), 1) - lambda * disruption + w * MSE(x_p, x)
Slab j of a step comes from "stream" j: the volumes v with v % batch == j, in that stream's own
shuffled order; all its random draws derive from (seed, step, j).

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

import json
import logging
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import config as config_mod
from procedures.protection.apply import export_protected, protect_volume
from procedures.protection.disruption import DisruptionStats
from procedures.protection.step import LOSS_NAMES, Entry, Run, build_run, train_step
from scanDataset import ScanDataset
from utils.atomic import atomic_write_text, check_output_dir, os_error_message
from utils.checkpoint import load_checkpoint, load_state_into, save_checkpoint
from utils.device import pick_device, torch_dtype
from utils.errors import ModelFileError, OutputError, UsageError, run_cli
from utils.images import save_grid
from utils.scan import check_min_size

log = logging.getLogger("mitsgan.train")


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
    """Every step of one stream as a PlanStep (epoch, volume, sub-batch index k, first slice s). The stream's
    volume order is shuffled per epoch from (seed, stream, epoch), so a resumed run replays the
    same order. The last depth % slab slices of a volume are not trained on (as published)."""
    steps = []
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([seed, stream, epoch]).permutation(len(volumes))
        for i in order:
            v = volumes[i]
            for k in range(depths[v] // cfg.slab):
                steps.append(PlanStep(epoch, v, k, k * cfg.slab))
    return steps


# --- main, top to bottom --------------------------------------------------------------------------
def resolve_config(argv) -> tuple[object, dict | None, Path | None]:
    """(config, checkpoint state or None, its path). A resumed run's identity comes from its
    checkpoint; only where and how long it runs (RESUMABLE_OVERRIDES) may change."""
    given = config_mod.given_flags(argv, description=__doc__)
    cfg = config_mod.make_config(given.get("preset", "paper"),
                                 **{k: v for k, v in given.items() if k != "preset"})
    resume = Path(cfg.out_dir) / "checkpoint.pt" if cfg.resume == "auto" else (Path(cfg.resume) if cfg.resume else None)
    if resume is None or (cfg.resume == "auto" and not resume.exists()):
        return cfg, None, None
    state = load_checkpoint(resume)
    saved = config_mod.checkpoint_config(state, resume)
    for name, value in given.items():  # a changed network or training flag is not silently ignored
        if name not in config_mod.RESUMABLE_OVERRIDES and value != getattr(saved, name):
            raise ModelFileError(f"{resume}: --{name} {value} differs from the checkpoint's "
                                 f"{getattr(saved, name)}; a resumed run keeps what it trains "
                                 f"(start a new run to change it)")
    for name in config_mod.RESUMABLE_OVERRIDES:
        if name in given or name in ("out_dir", "resume"):
            setattr(saved, name, getattr(cfg, name))
    return saved, state, resume


@dataclass
class Streams:
    """This rank's data: stream j owns the volumes v % batch == j."""
    ids: list[int]                      # the streams this rank runs
    volumes: dict[int, list[int]]       # stream -> its volume indices
    items: dict[int, object]            # volume index -> VolumeItem (in memory for the whole run)
    depths: dict[int, int]
    size: int                           # smallest slice side over all ranks (D's input size)


def load_streams(cfg, rank: int, world: int, dtype: torch.dtype) -> Streams:
    data = ScanDataset(cfg.data_dir, dtype=dtype, mhd_only=cfg.mhd_only)
    if len(data) < cfg.batch:
        raise UsageError(f"--batch {cfg.batch} needs at least {cfg.batch} volumes (one per stream), "
                         f"{cfg.data_dir} has {len(data)}")
    ids = [j for j in range(cfg.batch) if j % world == rank]
    volumes = {j: [v for v in range(len(data)) if v % cfg.batch == j] for j in ids}
    items = {v: data[v] for j in ids for v in volumes[j]}
    depths = {v: it.volume.shape[0] for v, it in items.items()}
    for it in items.values():  # the generator trains on slabs: the same minimum as protecting
        check_min_size(it.volume.shape, (cfg.slab, 1, 1), it.path, "training",
                       f"it cuts slabs of --slab {cfg.slab} slices")
    size = _all_min(min(min(it.volume.shape[1:]) for it in items.values()), world)
    return Streams(ids, volumes, items, depths, size)


def restore(run: Run, state: dict, resume: Path, master: bool) -> int:
    """Load a checkpoint's weights, optimisers, counters and RNG into `run`; the step to resume at."""
    load_state_into(run.G_raw, state["generator"], resume, "generator")
    load_state_into(run.D_raw, state["discriminator"], resume, "discriminator")
    load_state_into(run.opt_G, state["opt_G"], resume, "generator optimiser")
    load_state_into(run.opt_D, state["opt_D"], resume, "discriminator optimiser")
    try:
        if master:  # the saved counts are the sum over ranks
            run.disruption.stats = DisruptionStats.from_dict(state["disruption"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{resume}: incomplete checkpoint ({type(e).__name__}: {e})") from None
    log.info("resumed from %s at step %d", resume, start)
    return start


def save_run_checkpoint(run: Run, path: Path, step: int, seed: int, master: bool) -> None:
    stats = _merged_stats(run.disruption.stats, run.world)  # collective: every rank calls it
    if master:
        save_checkpoint(path, {
            "generator": run.G_raw.state_dict(), "discriminator": run.D_raw.state_dict(),
            "opt_G": run.opt_G.state_dict(), "opt_D": run.opt_D.state_dict(),
            "step": step, "config": run.cfg.to_dict() | {"seed": seed},
            "disruption": stats.as_dict(), "torch_rng": torch.get_rng_state()})


def export_scans(run: Run, items, seed: int, out: Path, master: bool) -> list[dict]:
    """Protect every volume this rank holds and write it to out/protected (HU, source geometry);
    the summary entries of all ranks."""
    prog = tqdm if run.cfg.progress and master else None
    exported = []
    for item in items.values():
        hu = protect_volume(run.G_raw, item, run.cfg, run.device, run.dtype, seed=seed, progress=prog)
        paths = export_protected(item, hu, out / "protected")
        diff = hu - item.scan.hu
        exported.append({"source": item.path, "written": [str(p) for p in paths],
                         "perturbation_rms_hu": float(np.sqrt(np.mean(diff ** 2))),
                         "perturbation_max_hu": float(np.abs(diff).max())})
        print(f"protected {item.path} -> {paths[0]} (perturbation RMS "
              f"{exported[-1]['perturbation_rms_hu']:.1f} HU)")
    return _gathered(exported, run.world)


class PlanStep(NamedTuple):
    """One step of one stream's schedule."""
    epoch: int
    volume: int                   # index into the dataset
    k: int                        # sub-batch index in the volume
    s: int                        # first slice


def train_loop(run: Run, data: Streams, plans: dict[int, list[PlanStep]], start: int, n_steps: int,
               seed: int, out: Path, master: bool) -> dict:
    """Steps start..n_steps-1 with logging, samples and checkpoints (rank 0: its own slabs).
    Returns per-step seconds ("gd", "attack") and the named losses of every step (rank 0)."""
    cfg = run.cfg
    writer = _tensorboard(out / "tb") if master else None
    history = {"gd": [], "attack": [], "losses": {}}
    bar = tqdm(range(start, n_steps), total=n_steps, initial=start, disable=not (cfg.progress and master),
               desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        entries = [Entry(j, data.items[p.volume], p.k, p.s) for j in data.ids for p in [plans[j][step]]]
        scalars, slabs = train_step(run, entries, step, seed)
        history["gd"].append(scalars["time/gd_s"])
        history["attack"].append(scalars["time/attack_s"])
        for name in LOSS_NAMES:
            if f"loss/{name}" in scalars:
                history["losses"].setdefault(name, []).append(scalars[f"loss/{name}"])
        if master:
            bar.set_postfix(D=f"{scalars['loss/D']:.3f}", G=f"{scalars['loss/G']:.3f}",
                            rms=f"{scalars['perturbation/rms_hu']:.1f}HU",
                            T=run.disruption.stats.computed)
            if writer is not None and (step % cfg.log_every == 0 or step == n_steps - 1):
                for name, val in scalars.items():
                    writer.add_scalar(name, val, step)
            if cfg.sample_every and step % cfg.sample_every == 0:
                sl = slabs[0]
                _sample_grid(out / "samples" / f"step{step:06d}.png", sl.item, sl.s, sl.x, sl.x_p, sl.tampered, step)
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
            save_run_checkpoint(run, out / "checkpoint.pt", step + 1, seed, master)
    bar.close()
    if writer is not None:
        writer.close()
    return history


def main(argv=None) -> int:
    cfg, state, resume = resolve_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(cfg.out_dir)
    rank, world, device = init_distributed(cfg)
    master = rank == 0
    if cfg.batch < world:
        raise UsageError(f"--batch {cfg.batch} is smaller than the {world} ranks: every rank needs a slab")
    seed = cfg.seed if cfg.seed >= 0 else int(np.random.SeedSequence().entropy % 2**31)
    if world > 1:  # an unseeded run still needs one seed on every rank
        seed = _broadcast_int(seed)
    torch.manual_seed(seed)
    dtype = torch_dtype(cfg.dtype)
    if master:
        check_output_dir(out)  # an impossible run folder fails now; nothing is written yet

    data = load_streams(cfg, rank, world, dtype)
    run = build_run(cfg, data.size, device, dtype, world)
    start = restore(run, state, resume, master) if state is not None else 0
    if master:  # only now that data, checkpoint and attacker are known good
        try:
            (out / "samples").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(os_error_message(out / "samples", e)) from None
        cfg.save(out / "config.json")

    plans = {j: schedule(cfg, data.volumes[j], data.depths, seed, j) for j in data.ids}
    n_steps = _all_min(min(len(p) for p in plans.values()), world)  # streams end together
    if cfg.max_steps:
        n_steps = min(n_steps, cfg.max_steps)
    history = train_loop(run, data, plans, start, n_steps, seed, out, master)
    save_run_checkpoint(run, out / "checkpoint.pt", n_steps, seed, master)

    stats = _merged_stats(run.disruption.stats, world)
    n_run = max(n_steps - start, 1)
    summary = {"steps": n_steps, "steps_this_run": n_steps - start, "seed": seed,
               "device": str(device), "dtype": cfg.dtype, "world_size": world, "batch": cfg.batch,
               "seconds_per_step_gd": sum(history["gd"]) / n_run,
               "seconds_per_step_attack": sum(history["attack"]) / n_run,
               "step_seconds": {"gd": history["gd"], "attack": history["attack"]},
               "losses": {k: float(np.mean(v)) for k, v in history["losses"].items()},
               "losses_last": {k: v[-1] for k, v in history["losses"].items()},
               "disruption": stats.as_dict()}
    if master:
        print(stats.summary())
    if n_steps > start and stats.computed == 0 and master:
        # docs/fidelity.md: on short or thick-slice scans the published loop never gets the term.
        log.warning("no sub-batch got the disruption term: this run was pure adversarial "
                    "training (near_end_rule=%s, depths=%s, exact_resample=%s)",
                    cfg.near_end_rule, sorted(data.depths.values()), cfg.exact_resample)
    if cfg.save_img_result:  # every rank exports its own volumes
        summary["exported"] = export_scans(run, data.items, seed, out, master)
    if master:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(f"G/D {summary['seconds_per_step_gd']:.3f} s/step, attacker "
              f"{summary['seconds_per_step_attack']:.3f} s/step on {device} x {world}; outputs in {out}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


# --- collectives (no-ops on one process) -----------------------------------------------------------
def _gathered(obj: list, world: int) -> list:
    """Concatenation of every rank's list, in rank order."""
    if world == 1:
        return obj
    parts = [None] * world
    dist.all_gather_object(parts, obj)
    return [x for p in parts for x in p]


def _all_min(value: int, world: int) -> int:
    return value if world == 1 else min(_gathered([value], world))


def _broadcast_int(value: int) -> int:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _merged_stats(stats: DisruptionStats, world: int) -> DisruptionStats:
    """The attacker counters summed over ranks."""
    if world == 1:
        return stats
    total = DisruptionStats()
    for d in _gathered([stats.as_dict()], world):
        part = DisruptionStats.from_dict(d)
        total.sub_batches += part.sub_batches
        total.computed += part.computed
        total.not_eligible += part.not_eligible
        total.errors.update(part.errors)
        total.attack_seconds += part.attack_seconds
    return total


def _tensorboard(path: Path):
    # TensorBoard's writer imports TensorFlow when installed (6 s here) unless the module
    # tensorboard.compat.notf exists; then it uses its own stub, which is all scalars need.
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    try:
        from torch.utils.tensorboard import SummaryWriter  # lazy: TensorBoard only when logging, after the stub above
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
