"""Helpers shared by several test files (plain functions; fixtures live in conftest.py)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from conftest import make_phantom
from utils import metrics as M
from utils.errors import run_cli
from utils.scan_io import Scan, save_mhd

SHAPE = (12, 40, 40)
SPACING = (2.5, 0.7, 0.7)

# Warnings a terminal would print (the default filters hide these kinds outside __main__).
_QUIET_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


# --- bad input, untrusted files, nothing lost (docs/safety.md) -----------------------------------------
def phantom_scan(seed: int = 0, shape=SHAPE, **kw) -> Scan:
    return Scan(make_phantom(shape, seed=seed), SPACING, (-20.0, 5.0, -7.5), **kw)


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root` (not following links) -> its SHA-256, 'dir' or 'link -> target'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclasses.dataclass
class Result:
    rc: int | None
    out: str
    err: str
    warned: list[str]
    exc: BaseException | None = None


def call(main: Callable, argv, capfd) -> Result:
    """run_cli(main, argv) capturing fd 1/2 and the warnings a terminal would show."""
    capfd.readouterr()
    exc = None
    rc = None
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            rc = run_cli(main, [str(a) for a in argv])
        except BaseException as e:  # noqa: BLE001 - a traceback is what we are looking for
            exc = e
    out, err = capfd.readouterr()
    shown = [f"{x.category.__name__}: {x.message}" for x in w if not issubclass(x.category, _QUIET_WARNINGS)]
    return Result(rc, out, err, shown, exc)


def assert_refused(res: Result, code: int, mention: tuple[str, ...], root: Path, before: dict[str, str],
                   entry: str = ""):
    """One 'error:' line naming one of `mention`, exit `code`, nothing new or changed under root."""
    assert res.exc is None, f"uncaught {type(res.exc).__name__}: {res.exc}"
    lines = res.err.strip().splitlines()
    assert res.rc == code, f"exit {res.rc}, expected {code}: {res.err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), res.err
    assert "Traceback" not in res.out + res.err
    assert any(m in lines[0] for m in mention), (mention, lines[0])
    assert not res.warned, res.warned
    after = tree(root)
    new = sorted(set(after) - set(before))
    assert not new, f"new files: {new}"
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, f"inputs changed or removed: {changed}"


@dataclasses.dataclass
class Ctx:
    root: Path
    ckpt: Path | None = None
    models: Path | None = None
    empty_models: Path | None = None
    key: Path | None = None  # verify.py: a seal key (made by _ctx)


# argv for train.py: the smallest demo run, the CT-GAN folder of `c` (empty: no attacker).
def train_argv(data, out, c, *extra):
    return ["--preset", "demo", "--data_dir", data, "--models_dir", c.empty_models, "--out_dir", out,
            "--g_width", "4", "--d_width", "4", "--progress", "false", "--sample_every", "0",
            "--max_steps", "1", "--save_img_result", "false", *extra]



# --- a real MITS-GAN checkpoint, fake LPIPS weights ---------------------------------------------
def make_tiny_checkpoint(root: Path, models: Path | None = None) -> Path:
    """A real train.py checkpoint: demo preset (U-Net), width 4, one step on two tiny phantoms.
    Without `models` the attacker folder is empty: the step has no disruption term (counted),
    and TensorFlow is never imported."""
    import train

    data = root / "scans"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        save_mhd(Scan(make_phantom((24, 48, 48), seed=i), SPACING, (-40.0 * i, 10.0, -20.0)), data / f"vol{i}.mhd")
    if models is None:
        models = root / "no_models"
        for sub in ("INJ", "REM"):
            (models / sub).mkdir(parents=True, exist_ok=True)
    out = root / "run"
    assert train.main(["--preset", "demo", "--data_dir", str(data), "--models_dir", str(models),
                       "--out_dir", str(out), "--g_width", "4", "--d_width", "4", "--progress", "false",
                       "--lr_g", "0.01", "--sample_every", "0", "--max_steps", "1",
                       "--save_img_result", "false"]) == 0
    return out / "checkpoint.pt"


def fake_lpips_state(seed=0) -> dict:
    """PLUMBING TEST ONLY: random tensors with the shapes of torchvision AlexNet features and the
    LPIPS v0.1 linear heads. Distances computed with these weights mean nothing; they only check
    that loading, shapes and the distance's algebra work."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (co, ci, k) in M.ALEX_CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(co, ci, k, k, generator=g) * 0.05
        sd[f"features.{i}.bias"] = torch.randn(co, generator=g) * 0.01
    for j, c in enumerate(M.LPIPS_CHANNELS):
        sd[f"lin{j}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=g)  # lpips heads are >= 0
    sd["classifier.1.weight"] = torch.zeros(2, 2)  # ignored key, as in a torchvision state dict
    return sd
