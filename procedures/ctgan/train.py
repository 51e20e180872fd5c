"""Train CT-GAN's injector or remover: the 3-D pix2pix of CT-GAN (docs/ctgan-training.md), in Keras 3.

    python -m procedures.ctgan.train --model inj --csv data/z2.5/nodules.csv --out models/INJ --preset demo

Writes into the model folder: G_model.h5 (Keras, loads with keras.models.load_model(...,
compile=False)), equalization.npz + normalization.npy (the preprocessing the attack needs),
config.json (the resolved training config), history.json (per-epoch mean losses) and
progress/epoch_NNN.png (middle slices of condition / generated / original).

Published behaviour kept: condition = cube with [6:26]^3 zeroed; D = least squares with the
inverted labels (real 0, fake 1), Adam(1e-6, beta1 0.5); combined G = MSE adversarial + 100 x L1,
Adam(2e-4, beta1 0.5); one D step on real and one on fake, then one G step, per batch. The
frozen D inside the combined model normalises with batch statistics, as Keras 2 did
(`frozen_d_batch_stats`; Keras 3 alone would use its moving averages).
Deliberate differences (docs/fidelity.md; the `reference` preset restores each): the data are
reshuffled every epoch (seeded) and every full batch is used, where the published loader
shuffles once and runs n_batches - 1 batches per epoch (`published_batching`); samples are
float HU, not integer HU (`integer_hu`); cubes are resampled to exactly 40^3
(`exact_resample`); G is saved at the end of every epoch, where the published trainer saves
at the start of every epoch after the first, never saving the last epoch's weights
(`published_save_schedule`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from procedures.ctgan.dataset import (
    MASK,
    N_AUG,
    TrainingSet,
    build_training_set,
    save_preprocessing,
)
from procedures.ctgan.models import (
    CUBE,
    build_discriminator,
    build_generator,
    call_frozen_batch_stats,
)
from procedures.attacker.keras_env import get_keras
from utils.cli import cli_main
from utils.errors import CliParser, OutputError, UsageError, run_cli

MODELS = ("inj", "rem")


@dataclass
class CTGANTrainConfig:
    model: str = "inj"                 # 'inj' (nodule locations) or 'rem' (healthy locations)
    gf: int = 100                      # generator filters in the first layer
    df: int = 100                      # discriminator filters in the first layer
    epochs: int = 200
    batch: int = 32
    # Cap on batches per epoch (a random subset each epoch); None = the whole set, as published.
    max_steps_per_epoch: int | None = None
    g_lr: float = 2e-4
    d_lr: float = 1e-6                 # sic: the published discriminator learns 200x slower
    beta1: float = 0.5
    l1_weight: float = 100.0
    seed: int = 0
    backend: str | None = None         # Keras backend; None = see resolve_backend()
    exact_resample: bool = True        # False: the published zoom (5 mm -> 30 or 42 mm cubes)
    published_save_schedule: bool = False
    published_batching: bool = False   # shuffled once, n_batches - 1 batches per epoch
    integer_hu: bool = False           # samples stay integer HU (published: int16 through SciPy)
    frozen_d_batch_stats: bool = True  # frozen D in the combined model: batch statistics (Keras 2)
    run_eagerly: bool = False          # skip TensorFlow's graph tracing (~30 s): very short runs
    progress_samples: int = 3          # cubes shown in each progress image
    preset: str = "paper"

    def validate(self) -> "CTGANTrainConfig":
        if self.model not in MODELS:
            raise UsageError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        for name in ("gf", "df", "epochs", "batch"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise UsageError("max_steps_per_epoch must be positive or None")
        return self


# 'paper' = the published training scripts. 'demo' = a couple of minutes per model on a 2-core
# CPU with the PyTorch backend: gf=df=8 (1.0 M + 0.18 M parameters instead of 189.5 M), batch 8,
# at most 16 batches per epoch (so the remover's 16 x 67 = 1072 cubes cost what the injector's
# 134 do), and G's learning rate raised to 1e-3 so ~200 steps already in-paint a blob.
PRESETS = {
    "paper": dict(gf=100, df=100, epochs=200, batch=32, max_steps_per_epoch=None),
    "demo": dict(gf=8, df=8, epochs=12, batch=8, max_steps_per_epoch=16, g_lr=1e-3),
    "reference": dict(gf=100, df=100, epochs=200, batch=32, max_steps_per_epoch=None,
                      exact_resample=False, published_save_schedule=True, published_batching=True,
                      integer_hu=True, frozen_d_batch_stats=True),
}


def make_config(preset: str = "paper", **overrides) -> CTGANTrainConfig:
    """A preset's config with `overrides` (None values are ignored) applied."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    names = {f.name for f in fields(CTGANTrainConfig)}
    bad = set(overrides) - names
    if bad:
        raise UsageError(f"unknown config field(s): {', '.join(sorted(bad))}")
    cfg = CTGANTrainConfig(**{**PRESETS[preset], "preset": preset})
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None}).validate()


def resolve_backend(requested: str | None, prefer_torch: bool = False) -> str | None:
    """The Keras backend to train on.

    Keras can load only one backend per process, so an already-imported Keras wins. The CLI
    prefers PyTorch: on this CPU its Conv3D backward pass is ~10x faster than TensorFlow's
    (same .h5 either way). In-process callers get keras_env's default (TensorFlow).
    """
    if requested:
        return requested
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    if prefer_torch:
        if importlib.util.find_spec("torch"):
            return "torch"
    return None


def make_condition(cubes: np.ndarray) -> np.ndarray:
    """Copy of (n, 32, 32, 32, 1) cubes with the in-painting region [6:26]^3 set to 0."""
    out = np.array(cubes, dtype=np.float32, copy=True)
    lo, hi = MASK
    out[:, lo:hi, lo:hi, lo:hi] = 0.0
    return out


def save_schedule(epochs: int, published: bool) -> list[tuple[int, str]]:
    """When G_model.h5 is written: (0-based epoch, 'start' | 'end').

    Published: at the start of every epoch after the first, so the last epoch's weights are
    never saved (and a 1-epoch run saves nothing). Ours: at the end of every epoch.
    """
    if published:
        return [(e, "start") for e in range(1, epochs)]
    return [(e, "end") for e in range(epochs)]


@dataclass
class TrainResult:
    out_dir: Path
    history: list = field(default_factory=list)   # per epoch: d_loss, g_loss, g_adv, g_l1, seconds
    wall_s: float = 0.0
    n_samples: int = 0
    backend: str = ""
    saved_epochs: int = 0    # epochs completed when G_model.h5 was last written (0: never)


# --- Keras pieces -------------------------------------------------------------------------------
def build_models(keras, cfg: CTGANTrainConfig):
    """(G, D, combined), compiled as published. D.trainable is toggled by train_step."""
    G = build_generator(keras, cfg.gf)
    D = build_discriminator(keras, cfg.df)
    D.compile(loss="mse", optimizer=keras.optimizers.Adam(cfg.d_lr, beta_1=cfg.beta1),
              run_eagerly=cfg.run_eagerly)
    img_a = keras.Input(shape=CUBE, name="c_img")
    img_b = keras.Input(shape=CUBE, name="c_cond")
    fake = G(img_b)
    # Keras 3 reads `trainable` when a train function is first built (TF) or at every call
    # (torch), not at compile time as Keras 2 did: train_step sets it before each call.
    D.trainable = False
    # Keras 2 ran a frozen D's BatchNorm on batch statistics in training; Keras 3 on its
    # moving averages (docs/fidelity.md, CT-GAN trainer).
    valid = (
        call_frozen_batch_stats(keras, D, fake, img_b)
        if cfg.frozen_d_batch_stats
        else D([fake, img_b])
    )
    combined = keras.Model([img_a, img_b], [valid, fake], name="combined")
    combined.compile(loss=["mse", "mae"], loss_weights=[1.0, cfg.l1_weight],
                     optimizer=keras.optimizers.Adam(cfg.g_lr, beta_1=cfg.beta1),
                     run_eagerly=cfg.run_eagerly)
    return G, D, combined


def train_step(G, D, combined, imgs_a: np.ndarray) -> dict:
    """One published pix2pix step on a batch of original cubes; returns the losses."""
    imgs_b = make_condition(imgs_a)
    n = len(imgs_a)
    patch = (n,) + tuple(int(s) for s in D.output.shape[1:])
    real = np.zeros(patch, np.float32)  # published labels are inverted: real 0, fake 1
    fake_lbl = np.ones(patch, np.float32)
    fake_a = np.asarray(G.predict_on_batch(imgs_b), dtype=np.float32)
    D.trainable = True
    d_real = float(D.train_on_batch([imgs_a, imgs_b], real))
    d_fake = float(D.train_on_batch([fake_a, imgs_b], fake_lbl))
    D.trainable = False
    g = combined.train_on_batch([imgs_a, imgs_b], [real, imgs_a], return_dict=True)
    adv = float(g.get("discriminator_loss", np.nan))
    l1 = float(g.get("generator_loss", np.nan))
    return {"d_loss": 0.5 * (d_real + d_fake), "g_loss": float(g["loss"]), "g_adv": adv, "g_l1": l1}


def save_generator(G, out_dir: Path) -> Path:
    """Write G_model.h5 atomically (Keras needs the .h5 suffix to pick the HDF5 format)."""
    dst = out_dir / "G_model.h5"
    tmp = out_dir / "G_model.tmp.h5"
    try:  # .h5 on purpose: the published weights use it (keras_env drops Keras's notice)
        G.save(tmp)
    except OSError as e:
        raise OutputError(f"{tmp}: cannot write the generator ({e})") from None
    os.replace(tmp, dst)
    return dst


def epoch_batches(n: int, batch: int, steps: int, rng: np.random.Generator,
                  published: bool, once: np.ndarray | None = None) -> list[np.ndarray]:
    """Sample indices of each batch of one epoch.

    Ours: a fresh permutation every epoch, `steps` full batches. Published (the CT-GAN
    loader): the order `once` drawn when the data were loaded, the same every epoch, and
    n // batch - 1 batches (its loop stops one batch early)."""
    if published:
        order = np.arange(n) if once is None else once
        return [order[b * batch:(b + 1) * batch] for b in range(min(steps, n // batch - 1))]
    order = rng.permutation(n)
    return [order[b * batch:(b + 1) * batch] for b in range(steps)]


def _progress_indices(n: int, k: int) -> np.ndarray:
    """Cubes for the progress images: un-augmented originals of locations spread over the set
    (samples come in blocks of 67 per location, the original first)."""
    k = max(1, min(k, n))
    if n % N_AUG == 0:
        locs = np.unique(np.linspace(0, n // N_AUG - 1, k).round().astype(int))
        return locs * N_AUG
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def save_progress_image(G, cubes: np.ndarray, path: Path, title: str) -> None:
    """Middle axial slice of condition / generated / original for a few cubes (PNG)."""
    from matplotlib.backends.backend_agg import (
        FigureCanvasAgg,
    )  # lazy: matplotlib only when a figure is drawn
    from matplotlib.figure import Figure

    cond = make_condition(cubes)
    gen = np.asarray(G.predict_on_batch(cond))
    rows = (("condition", cond), ("generated", gen), ("original", cubes))
    k = len(cubes)
    fig = Figure(figsize=(2.0 * k, 6.3))
    FigureCanvasAgg(fig)
    vmin, vmax = float(cubes.min()), float(cubes.max())
    for r, (name, arr) in enumerate(rows):
        for c in range(k):
            ax = fig.add_subplot(3, k, r * k + c + 1)
            ax.imshow(arr[c, 16, :, :, 0], cmap="bone", vmin=vmin, vmax=vmax)
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=72)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# --- training ---------------------------------------------------------------------------------
def _run_epoch(models, x: np.ndarray, batches, desc: str, progress: bool) -> dict:
    """One epoch of train_step over `batches` (index arrays into x) with a progress bar; the
    epoch's mean losses and its seconds."""
    t0 = time.perf_counter()
    losses = []
    bar = tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=True)
    for idx in bar:
        losses.append(train_step(*models, x[idx]))
        bar.set_postfix(d=f"{losses[-1]['d_loss']:.4f}", g=f"{losses[-1]['g_loss']:.3f}",
                        l1=f"{losses[-1]['g_l1']:.4f}")
    bar.close()
    rec = {k: float(np.mean([step[k] for step in losses])) for k in losses[0]}
    return rec | {"seconds": time.perf_counter() - t0}
@contextmanager
def deterministic_kernels(backend: str):
    """Deterministic kernels of the Keras backend while a training runs, so that a seeded run
    repeats bit for bit on one machine with one thread count (what still varies: docs/results.md,
    "What cannot be deterministic"); the previous setting is restored afterwards. TensorFlow needs
    its seed set first (keras.utils.set_random_seed)."""
    if backend == "tensorflow":
        # lazy, and the internal module: the public tf.config can enable op determinism but
        # neither query nor undo it
        from tensorflow.python.framework import config as tf_config
        was = tf_config.is_op_determinism_enabled()
        tf_config.enable_op_determinism()
        try:
            yield
        finally:
            if not was:
                tf_config.disable_op_determinism()
    elif backend == "torch":
        import torch  # lazy: already loaded by Keras on this backend
        was = torch.are_deterministic_algorithms_enabled()
        was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        # warn_only: a kernel without a deterministic variant warns instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was, warn_only=was_warn)
    else:
        yield


def train(data: TrainingSet, out_dir, cfg: CTGANTrainConfig, progress: bool = True,
          extra_config: dict | None = None) -> TrainResult:
    """Train G and D on `data` (see procedures.ctgan.dataset) and write the model folder."""
    cfg.validate()
    out_dir = Path(out_dir)
    try:
        (out_dir / "progress").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the model folder ({e.strerror})") from None
    keras = get_keras(resolve_backend(cfg.backend))
    keras.utils.set_random_seed(cfg.seed)
    with deterministic_kernels(keras.backend.backend()):
        return _fit(keras, data, out_dir, cfg, progress, extra_config)


def _fit(keras, data: TrainingSet, out_dir: Path, cfg: CTGANTrainConfig, progress: bool,
         extra_config: dict | None) -> TrainResult:
    """The training loop of train(), seeded, with deterministic kernels."""
    backend = keras.backend.backend()
    rng = np.random.default_rng(cfg.seed)

    x = np.ascontiguousarray(data.samples, dtype=np.float32)
    n = len(x)
    batch = min(cfg.batch, n)
    n_batches = n // batch
    usable = n_batches - 1 if cfg.published_batching else n_batches
    if usable < 1:
        raise UsageError(f"{n} samples make {n_batches} batch(es) of {batch}: the published loader "
                         "runs n_batches - 1 per epoch, so it needs at least 2")
    steps = usable if cfg.max_steps_per_epoch is None else min(usable, cfg.max_steps_per_epoch)
    show = x[_progress_indices(n, cfg.progress_samples)]

    try:
        save_preprocessing(out_dir, data.equalizer, data.normalization)
        _write_json(out_dir / "config.json", {**asdict(cfg), "backend": backend, "n_samples": n,
                                              "steps_per_epoch": steps, **(extra_config or {})})
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot write the model folder ({e.strerror or e})") from None
    G, D, combined = build_models(keras, cfg)

    result = TrainResult(out_dir=out_dir, n_samples=n, backend=backend)
    saves = set(save_schedule(cfg.epochs, cfg.published_save_schedule))
    once = rng.permutation(n)  # the published loader's one shuffle (unused otherwise)
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        if (epoch, "start") in saves:
            save_generator(G, out_dir)
            result.saved_epochs = epoch
        batches = epoch_batches(n, batch, steps, rng, cfg.published_batching, once)
        desc = f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}"
        rec = _run_epoch((G, D, combined), x, batches, desc, progress)
        rec["epoch"] = epoch + 1
        result.history.append(rec)
        save_progress_image(
            G,
            show,
            out_dir / "progress" / f"epoch_{epoch + 1:03d}.png",
            f"{cfg.model} epoch {epoch + 1}: D {rec['d_loss']:.4f}  G {rec['g_loss']:.3f}",
        )
        if (epoch, "end") in saves:
            save_generator(G, out_dir)
            result.saved_epochs = epoch + 1
        _write_json(out_dir / "history.json", result.history)
    result.wall_s = time.perf_counter() - t0
    return result


def train_from_csv(csv_path, out_dir, cfg: CTGANTrainConfig, progress: bool = True) -> TrainResult:
    """Build the training set from `csv_path` (docs/ctgan-training.md) and train."""
    data = build_training_set(csv_path, exact_resample=cfg.exact_resample, progress=progress,
                              integer_hu=cfg.integer_hu)
    return train(data, out_dir, cfg, progress=progress, extra_config={"csv": str(csv_path)})


# --- CLI ----------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = CliParser(
        prog="python -m procedures.ctgan.train",
        description="Train CT-GAN's injector (nodule locations) or remover (healthy locations).",
    )
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--csv", required=True, help="locations CSV: filename,z,y,x[,coord]")
    p.add_argument("--out", required=True, help="model folder, e.g. models/INJ")
    p.add_argument(
        "--preset",
        default="paper",
        choices=sorted(PRESETS),
        help="paper: published settings (GPU, days); reference: also the published "
        "loader, integer-HU samples, zoom and save schedule; demo: minutes on a CPU",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--gf", type=int)
    p.add_argument("--df", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--max-steps-per-epoch", type=int, dest="max_steps_per_epoch")
    p.add_argument("--seed", type=int)
    p.add_argument("--backend", choices=("tensorflow", "torch"),
                   help="Keras backend (default: torch when installed: faster on CPU)")
    p.add_argument(
        "--published-resample",
        action="store_true",
        help="CT-GAN's zoom instead of an exact 40^3 resample (5 mm scans then give 30/42 mm)",
    )
    p.add_argument("--published-save-schedule", action="store_true",
                   help="save G only at the start of epochs 2.. (the last epoch is never saved)")
    p.add_argument(
        "--published-batching",
        action="store_true",
        help="shuffle once at load and run n_batches - 1 batches per epoch, as published",
    )
    p.add_argument("--integer-hu", action="store_true",
                   help="keep the samples integer HU (int16 through SciPy), as published")
    p.add_argument("--keras3-frozen-d", action="store_true",
                   help="the frozen D inside the combined model uses its moving averages (Keras 3) "
                        "instead of the published batch statistics (Keras 2)")
    p.add_argument(
        "--eager",
        action="store_true",
        help="run Keras eagerly (TensorFlow: skips ~30 s of graph tracing; for very short runs)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@cli_main(_parser)
def main(a) -> int:
    cfg = make_config(
        a.preset,
        model=a.model,
        epochs=a.epochs,
        gf=a.gf,
        df=a.df,
        batch=a.batch,
        max_steps_per_epoch=a.max_steps_per_epoch,
        seed=a.seed,
        backend=resolve_backend(a.backend, prefer_torch=True),
        exact_resample=False if a.published_resample else None,
        published_save_schedule=a.published_save_schedule or None,
        run_eagerly=a.eager or None,
        published_batching=a.published_batching or None,
        integer_hu=a.integer_hu or None,
        frozen_d_batch_stats=False if a.keras3_frozen_d else None,
    )
    res = train_from_csv(a.csv, a.out, cfg, progress=not a.quiet)
    last = res.history[-1]
    print(
        f"trained {cfg.model} ({cfg.preset}: gf={cfg.gf} df={cfg.df} batch={cfg.batch} "
        f"epochs={cfg.epochs}, {res.n_samples} samples, backend {res.backend}) in {res.wall_s:.1f} s; "
        f"last epoch D {last['d_loss']:.4f} G {last['g_loss']:.4f} (adv {last['g_adv']:.4f}, "
        f"L1 {last['g_l1']:.4f})"
    )
    if res.saved_epochs:
        print(f"wrote {res.out_dir / 'G_model.h5'} (weights after epoch {res.saved_epochs})")
    else:
        print(
            f"warning: no G_model.h5 written: the published save schedule saves only at the start "
            f"of epochs 2..{cfg.epochs}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
