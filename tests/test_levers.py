"""The untargeted white-box levers (config fields wb_locations, wb_shift, ensemble_models) and the
batched protection of the attacked cube's slabs, on tiny synthetic volumes and tiny CT-GANs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import config as config_mod
import train
from procedures.protection import step
from procedures.protection.apply import eps_scale
from conftest import build_tiny_ctgan_models, make_phantom
from procedures.attacker.interface import Slab
from utils.errors import UsageError
from utils.scan_io import Scan, save_mhd

pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def item(tmp_path_factory):
    from scanDataset import ScanDataset
    d = tmp_path_factory.mktemp("lever_scans")
    save_mhd(Scan(make_phantom((24, 48, 48), seed=3), (2.5, 0.7, 0.7), (0.0, 0.0, 0.0)), d / "v.mhd")
    return ScanDataset(d)[0]


def _setup(models, **kw):
    from generator import UNetGenerator
    from procedures.protection.whitebox import WhiteboxDisruption
    cfg = config_mod.make_config("whitebox", models_dir=str(models), eps_hu=50.0, whitebox_cube=False, **kw)
    torch.manual_seed(0)
    G = UNetGenerator(slab=4, width=4, depth=2, out_init_std=0.1)
    return cfg, G, WhiteboxDisruption(cfg, torch.device("cpu"))


def _slab(cfg, G, item, s=8, seed=0):
    x = item.volume[s:s + 4].unsqueeze(0)
    delta = torch.full_like(x, 0.5)  # fixed noise: the same x_p at every call
    return Slab(0, item, 0, s, np.random.default_rng(seed), x, delta, G(x, delta, scale=eps_scale(cfg, item)))


def test_locations_are_batched_and_averaged(item, tiny_ctgan_models):
    """wb_locations 3: one batched CT-GAN call gives the mean of the three one-location losses."""
    cfg, G, wb = _setup(tiny_ctgan_models, wb_locations=3)
    centres = wb.centres(_slab(cfg, G, item))
    assert len(centres) == 3 and len(set(centres)) == 3
    wb.centres = lambda sl: centres
    many = wb.loss(_slab(cfg, G, item)).item()
    singles = []
    for c in centres:
        wb.centres = lambda sl, c=c: [c]
        singles.append(wb.loss(_slab(cfg, G, item)).item())
    assert many == pytest.approx(np.mean(singles), rel=1e-5)
    assert np.std(singles) > 0  # the three locations really differ


def test_shift_moves_each_centre_by_at_most_wb_shift(item, tiny_ctgan_models):
    cfg, G, wb = _setup(tiny_ctgan_models, wb_locations=8)
    plain = wb.centres(_slab(cfg, G, item, seed=4))
    cfg.wb_shift = 2
    moved = wb.centres(_slab(cfg, G, item, seed=4))  # same draws, then the offsets
    off = np.abs(np.subtract(moved, plain))
    assert off.max() <= 2 and off.sum() > 0
    assert all(0 <= c < n for cen in moved for c, n in zip(cen, item.scan.hu.shape))


def test_ensemble_loss_is_the_mean_over_attackers(item, tiny_ctgan_models, tmp_path):
    other = build_tiny_ctgan_models(tmp_path / "other", seed=7)
    _, _, wb_a = _setup(tiny_ctgan_models)
    _, _, wb_b = _setup(other)
    cfg, G, wb_ab = _setup(tiny_ctgan_models, ensemble_models=str(other))
    assert len(wb_ab.attackers) == 2
    losses = [wb.loss(_slab(cfg, G, item)).item() for wb in (wb_a, wb_b, wb_ab)]
    assert losses[0] != pytest.approx(losses[1])
    assert losses[2] == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-5)


def test_cube_slabs_in_one_batched_call_equal_one_call_each(item, tiny_ctgan_models):
    """The U-Net (GroupNorm: per sample) protects the cube's other slabs in one call; the result
    equals protecting each on its own with the same noise draws."""
    cfg = config_mod.make_config("whitebox", models_dir=str(tiny_ctgan_models), g_width=4, d_width=4)
    run = step.build_run(cfg, 48, torch.device("cpu"), torch.float32)
    assert step._per_sample_norms(run.G_raw)
    run.G.train()
    sl = _slab(cfg, run.G, item)
    sl.rng = np.random.default_rng(11)
    batched = step._slab_protector(run, sl)([0, 4, 12])
    rng = np.random.default_rng(11)
    for i, t in enumerate([0, 4, 12]):  # each slab by hand: its slices, its own noise draw
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 63)))
        x = item.volume[t:t + cfg.slab].unsqueeze(0)
        delta = torch.rand(x.shape, generator=gen, dtype=torch.float32)
        one = run.G(x, delta, scale=eps_scale(cfg, item))
        torch.testing.assert_close(batched[i:i + 1], one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv", [["--wb_locations", "2"], ["--wb_shift", "1"], ["--ensemble_models", "m2"]])
def test_levers_need_whitebox(argv):
    with pytest.raises(UsageError, match="need --attack_mode whitebox") as e:
        config_mod.parse_args(["--preset", "paper", *argv])
    assert "\n" not in str(e.value)


def test_bad_lever_values():
    for kw in ({"wb_locations": 0}, {"wb_shift": -1}):
        with pytest.raises(UsageError):
            config_mod.make_config("whitebox", **kw)


def test_training_with_levers_logs_named_losses(item, tiny_ctgan_models, tmp_path):
    out = tmp_path / "run"
    argv = ["--preset", "whitebox", "--data_dir", str(Path(item.path).parent),
            "--models_dir", str(tiny_ctgan_models), "--out_dir", str(out), "--g_width", "4",
            "--d_width", "4", "--progress", "false", "--sample_every", "0", "--max_steps", "2",
            "--wb_locations", "3", "--wb_shift", "1", "--ensemble_models", str(tiny_ctgan_models)]
    assert train.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["disruption"]["computed"] == 2 and summary["disruption"]["errors"] == {}
    assert set(summary["losses"]) == set(step.LOSS_NAMES)
    assert summary["losses"]["G_disrupt"] > 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["wb_locations"], saved["wb_shift"]) == (3, 1)
