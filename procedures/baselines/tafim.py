"""TAFIM (Aneja et al., ECCV 2022), the published baseline, adapted to CT: the method (protect a
volume, the evaluation's method) and the command line. The network and its checkpoints are in
procedures/baselines/tafim_net.py, the loss and the training loop in tafim_train.py.

    python -m procedures.baselines.tafim --data data/z2.5 --models models --out runs/tafim \
        --steps 2000
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
  (the same Keras G_model.h5 files the evaluation attacks with; docs/attack.md#pytorch-port,
  steps 1-7, cubic
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
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from procedures.baselines.tafim_net import (  # noqa: F401 - re-exported: the module's API
    CKPT_KIND, TafimConfig, TafimUNet, build_model, checkpoint_state, load_tafim, parse_target,
    read_checkpoint)
from procedures.baselines.tafim_train import (  # noqa: F401 - re-exported: the module's API
    ACTIONS, TafimObjective, _assemble, curve_summary, draw_sample, load_training_inputs,
    make_locator, start_model, step_seeds, train_steps, write_summary)
from procedures.protection.apply import run_slabs
from utils.checkpoint import save_checkpoint
from utils.device import pick_device
from utils.cli import cli_main
from utils.errors import CliParser, OutputError, UsageError, run_cli


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
        raise UsageError(f"TAFIM: volume has {hu.shape[0]} slices, fewer than a slab of "
                         f"{model.slab}")
    return run_slabs(lambda x, _starts: model(x), hu, model.slab, device, hu_min=hu_min,
                     hu_max=hu_max, dtype=next(model.parameters()).dtype, batch=batch, out=out,
                     progress=progress, desc=desc)


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
    p.add_argument("--width", type=int, default=d.width,
                   help=f"U-Net filters ngf (default {d.width}, as TAFIM)")
    p.add_argument("--depth", type=int, default=d.depth,
                   help=f"U-Net down-convolutions (default {d.depth})")
    p.add_argument("--slab", type=int, default=d.slab, help=f"slices per image (default {d.slab})")
    p.add_argument("--noise-size", type=int, default=d.noise_size,
                   help="side of the global noise tensor")
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
    p.add_argument("--ckpt-every", type=int, default=50,
                   help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    return p


@cli_main(build_parser)
def main(args) -> int:
    if args.steps < 1 or args.ckpt_every < 1 or args.max_minutes < 0 or args.seed < 0:
        raise UsageError("--steps and --ckpt-every must be >= 1, --max-minutes and --seed >= 0")
    cfg = TafimConfig(slab=args.slab, width=args.width, depth=args.depth,
                      dropout=not args.no_dropout, noise_size=args.noise_size,
                      perturb_weight=args.perturb_weight, lr=args.lr,
                      target=args.target, global_term=not args.no_global_term, seed=args.seed,
                      data=args.data, models=args.models).validate()
    device = pick_device(args.device)
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    # Everything that can fail cheaply fails before training.
    items, objective = load_training_inputs(args.data, args.models, cfg, device)
    state = read_checkpoint(ckpt_path) if args.resume else None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    model, optimizer, start, history = start_model(cfg, device, state, ckpt_path)
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
    t0, c0 = time.perf_counter(), time.process_time()
    train_steps(model, objective, optimizer, items, make_locator(cfg), cfg, start, args.steps,
                progress=None if args.no_progress else tqdm, deadline=deadline, on_step=on_step)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    done = history[-1]["step"] + 1 if history else start
    save(done)
    write_summary(out, cfg, history, start, done, wall, str(device), n_params, cpu_seconds=cpu)
    print(f"wrote {ckpt_path} (step {done}), {out / 'summary.json'}, {out / 'history.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
