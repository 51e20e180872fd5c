"""TAFIM's training (Aneja et al., ECCV 2022) adapted to CT: the loss through the differentiable
CT-GAN and the seeded training loop (procedures/baselines/tafim.py describes the adaptation).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from procedures.baselines.tafim_net import TafimConfig, TafimUNet, build_model, parse_target
from procedures.protection.apply import slab_starts, slabs_meeting
from utils.atomic import atomic_write_text
from utils.checkpoint import load_state_into
from utils.cubes import cube_bounds
from utils.errors import InputFileError, UsageError
from utils.hu_range import span, to_hu, to_net

ACTIONS = ("inject", "remove")


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
        # lazy: the attacker pulls SciPy
        from procedures.attacker.model_dir import load_attacker_pair

        return cls(load_attacker_pair(models, device), cfg)

    def target_norm(self, item) -> float:
        """The uniform target in the item's normalised units."""
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
        return to_net(hu, item.hu_min, item.hu_max)

    def cube_slabs(self, item, center) -> list[int]:
        depth = item.volume.shape[0]
        cut = self.tamper.cut_shape(item.scan.spacing)
        _, _, a, e = cube_bounds(center, cut, item.volume.shape)
        return slabs_meeting(depth, self.cfg.slab, int(a[0]), int(max(e[0], a[0] + 1)))

    def _recon(self, sub: torch.Tensor, z0: int, item, center, action,
               target: float) -> torch.Tensor:
        sub_hu = to_hu(sub.float(), item.hu_min, item.hu_max)
        c = (int(center[0]) - z0, int(center[1]), int(center[2]))
        part, _ = self.tamper.footprints(sub_hu, item.scan.spacing, c, action)[0]
        part_n = to_net(part, item.hu_min, item.hu_max)
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
            parts["pert_rms_hu"] = (float((xp - x).pow(2).mean().sqrt())
                                    * span(item.hu_min, item.hu_max) / 2.0)
        parts["loss"] = loss.item()
        parts["slabs"] = len(starts)
        return loss, parts


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

    return Locator(SimpleNamespace(slab=cfg.slab, tamper_z="slab", tamper_yx="lung",
                                   near_end_rule=False))


def train_steps(model, objective, optimizer, items, locator, cfg: TafimConfig, start: int,
                stop: int, *, progress=None, deadline: float | None = None,
                on_step=None) -> list[dict]:
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


def write_summary(out: Path, cfg: TafimConfig, history: list, start: int, done: int, wall: float,
                  device: str, n_params: int, cpu_seconds: float | None = None) -> None:
    """summary.json and history.json of a TAFIM run, and the loss curve on the console."""
    curve = curve_summary(history)
    secs = [r["seconds"] for r in history[len(history) - (done - start):]] if done > start else []
    summary = {"config": asdict(cfg), "steps_done": done, "steps_this_run": done - start,
               "wall_seconds_this_run": wall, "cpu_seconds_this_run": cpu_seconds,
               "seconds_per_step": float(np.mean(secs)) if secs else None,
               "seconds_per_step_median": float(np.median(secs)) if secs else None,
               "curve": curve, "device": device, "parameters": n_params}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "history.json", json.dumps(history, indent=0) + "\n")
    for c in curve:
        print(f"  steps {c['steps']}: loss {c['loss']:.4f}  recon {c['recon']:.4f}  "
              f"perturb {c['perturb']:.2e} ({c['pert_rms_hu']:.1f} HU RMS)  "
              f"{c['seconds']:.2f} s/step")


def load_training_inputs(data_dir, models, cfg: TafimConfig, device) -> tuple[list, TafimObjective]:
    """The training scans (every one at least a slab deep) and the objective with its CT-GAN."""
    from scanDataset import ScanDataset  # lazy: the dataset reader only for training

    data = ScanDataset(data_dir)
    items = [data[i] for i in range(len(data))]
    for it in items:
        if it.volume.shape[0] < cfg.slab:
            raise InputFileError(f"{it.path}: {it.volume.shape[0]} slices, fewer than a slab "
                                 f"of {cfg.slab}")
    return items, TafimObjective.from_model_dirs(models, cfg, device)


def start_model(cfg: TafimConfig, device, state: dict | None, ckpt_path) -> tuple:
    """(model, Adam, first step, history): seeded fresh weights, or those of `state` (a resumed
    checkpoint, which must hold the same network)."""
    if state is not None:
        saved = TafimConfig.from_dict(state["config"], str(ckpt_path))
        diff = [k for k in TafimConfig.ARCH if getattr(saved, k) != getattr(cfg, k)]
        if diff:
            raise UsageError(f"{ckpt_path}: saved with another network "
                             f"({', '.join(f'{k}={getattr(saved, k)}' for k in diff)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if state is None:
        return model, optimizer, 0, []
    load_state_into(model, state["model"], ckpt_path, "TAFIM model")
    if state.get("optimizer"):
        load_state_into(optimizer, state["optimizer"], ckpt_path, "optimiser state")
    return model, optimizer, int(state["step"]), list(state.get("history") or [])
