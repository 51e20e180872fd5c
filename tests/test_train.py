"""train.py end to end on a tiny synthetic volume with a real (tiny) Keras CT-GAN attacker."""
import json

import numpy as np
import pytest
import torch

import train
from procedures.protection import step
from conftest import make_phantom
from utils.checkpoint import load_checkpoint
from utils.scan_io import Scan, load_scan, save_mhd

pytestmark = pytest.mark.tf

SPACING = (2.5, 0.7, 0.7)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("scans")
    for i in range(2):
        save_mhd(Scan(make_phantom((24, 48, 48), seed=i), SPACING, (-40.0 * i, 10.0, -20.0)), d / f"vol{i}.mhd")
    return d


def run(tiny_data, models, out, *extra):
    argv = ["--preset", "demo", "--data_dir", str(tiny_data), "--models_dir", str(models),
            "--out_dir", str(out), "--g_width", "4", "--d_width", "4", "--progress", "false",
            "--lr_g", "0.01", "--sample_every", "0", *extra]
    assert train.main(argv) == 0
    return load_checkpoint(out / "checkpoint.pt")


def test_three_steps_with_attacker(tiny_data, tiny_ctgan_models, tmp_path):
    state = run(tiny_data, tiny_ctgan_models, tmp_path, "--max_steps", "3", "--sample_every", "1")
    assert state["step"] == 3
    stats = state["disruption"]
    # The demo preset tampers inside every slab: every step got the disruption term.
    assert stats == {**stats, "sub_batches": 3, "computed": 3, "not_eligible": 0, "errors": {}}
    assert len(list((tmp_path / "samples").glob("*.png"))) == 3
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seconds_per_step_attack"] > 0 and summary["seconds_per_step_gd"] > 0
    # Named losses (pix2pix's loss_names), the black-box disruption among them.
    assert set(summary["losses"]) == set(step.LOSS_NAMES) and summary["losses"]["G_disrupt"] > 0
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["preset"] == "demo" and saved["g_width"] == 4


def test_same_seed_same_weights(tiny_data, tiny_ctgan_models, tmp_path):
    a = run(tiny_data, tiny_ctgan_models, tmp_path / "a", "--max_steps", "3")
    b = run(tiny_data, tiny_ctgan_models, tmp_path / "b", "--max_steps", "3")
    c = run(tiny_data, tiny_ctgan_models, tmp_path / "c", "--max_steps", "3", "--seed", "1")
    for k in a["generator"]:
        assert torch.equal(a["generator"][k], b["generator"][k]), k
    assert any(not torch.equal(a["generator"][k], c["generator"][k]) for k in a["generator"])


def test_resume_continues_exactly(tiny_data, tiny_ctgan_models, tmp_path):
    full = run(tiny_data, tiny_ctgan_models, tmp_path / "full", "--max_steps", "5")
    run(tiny_data, tiny_ctgan_models, tmp_path / "part", "--max_steps", "2")
    resumed = run(tiny_data, tiny_ctgan_models, tmp_path / "part", "--max_steps", "5", "--resume", "auto")
    assert resumed["step"] == 5
    for net in ("generator", "discriminator"):
        for k in full[net]:
            assert torch.equal(full[net][k], resumed[net][k]), (net, k)
    assert resumed["disruption"]["computed"] == full["disruption"]["computed"] == 5


def test_export_keeps_geometry_and_differs_only_by_perturbation(tiny_data, tiny_ctgan_models, tmp_path):
    run(tiny_data, tiny_ctgan_models, tmp_path, "--max_steps", "4", "--save_img_result", "true")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["exported"]) == 2
    for entry in summary["exported"]:
        src = load_scan(entry["source"])
        prot = load_scan(entry["written"][0])
        assert prot.hu.dtype == src.hu.dtype == np.int16
        np.testing.assert_array_equal(prot.spacing, src.spacing)
        np.testing.assert_array_equal(prot.origin, src.origin)
        diff = prot.hu.astype(np.int32) - src.hu
        assert 0 < np.abs(diff).max() <= np.ceil(entry["perturbation_max_hu"])
        assert np.sqrt(np.mean(diff.astype(float) ** 2)) == pytest.approx(entry["perturbation_rms_hu"], abs=0.5)


def test_reference_preset_reports_no_disruption_on_short_volumes(tiny_data, tiny_ctgan_models, tmp_path, caplog):
    # Published near-end rule: 32 < s and s + 32 < depth. A 24-slice volume never qualifies.
    state = run(tiny_data, tiny_ctgan_models, tmp_path, "--preset", "reference", "--max_steps", "2",
                "--g_width", "4", "--g_blocks", "1")
    assert state["disruption"]["computed"] == 0
    assert state["disruption"]["not_eligible"] == 2
    assert any("no sub-batch got the disruption term" in r.message for r in caplog.records)
    assert state["generator"]["head.0.weight"].dtype == torch.float64


def test_attacker_errors_are_counted_not_silent(tiny_data, tmp_path, caplog):
    # A models folder without G_model.h5: our default fails loudly per step and counts it.
    (tmp_path / "models" / "INJ").mkdir(parents=True)
    (tmp_path / "models" / "REM").mkdir(parents=True)
    state = run(tiny_data, tmp_path / "models", tmp_path / "out", "--max_steps", "2")
    assert state["disruption"]["computed"] == 0
    assert sum(state["disruption"]["errors"].values()) == 2
    assert any("attacker failed" in r.message for r in caplog.records)


def test_whitebox_bounded_quantised_training(tiny_data, tiny_ctgan_models, tmp_path):
    """White-box mode (docs/training.md#white-box-loss): gradients through the PyTorch CT-GAN, eps bound in HU, int16 quantisation."""
    state = run(tiny_data, tiny_ctgan_models, tmp_path, "--preset", "whitebox", "--g_width", "4",
                "--d_width", "4", "--max_steps", "3", "--eps_hu", "5", "--save_img_result", "true")
    assert state["disruption"]["computed"] == 3 and state["disruption"]["errors"] == {}
    summary = json.loads((tmp_path / "summary.json").read_text())
    for entry in summary["exported"]:
        # The bound holds on every voxel of the exported int16 scan (5 HU, +0.5 from rounding).
        assert entry["perturbation_max_hu"] <= 5.5


def _wb_slab(item, s, x_p, k=0, seed=0, protect=None):
    from procedures.attacker.interface import Slab
    x = item.volume[s:s + 4].unsqueeze(0)
    return Slab(0, item, k, s, np.random.default_rng(seed), x, torch.zeros_like(x), x_p, protect)


def test_whitebox_gradient_reaches_generator_weights(tiny_data, tiny_ctgan_models):
    import config as config_mod
    from generator import UNetGenerator
    from procedures.protection.whitebox import WhiteboxDisruption
    from scanDataset import ScanDataset

    cfg = config_mod.make_config("whitebox", models_dir=str(tiny_ctgan_models), eps_hu=50.0)
    item = ScanDataset(tiny_data)[0]
    torch.manual_seed(0)
    G = UNetGenerator(slab=4, width=4, depth=2)
    torch.nn.init.normal_(G.out.weight, 0, 0.1)  # leave the identity start so x_p != x
    wb = WhiteboxDisruption(cfg, torch.device("cpu"))
    s = 8
    x = item.volume[s:s + 4].unsqueeze(0)
    x_p = G(x, scale=2 * 50.0 / (item.hu_max - item.hu_min))
    loss = wb.loss(_wb_slab(item, s, x_p))
    assert loss.item() > 0
    loss.backward()
    grads = [p.grad for p in G.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    # The attacker itself stays frozen.
    assert all(not p.requires_grad for p in wb.dt.parameters())


def test_whitebox_cube_protects_every_slab_the_cube_touches(tiny_data, tiny_ctgan_models):
    """--whitebox_cube: the slabs around the step's one are protected by G too (with grad, in one
    call), as protect.py protects the whole scan; the loss then differs from the one-slab loss."""
    import config as config_mod
    from generator import UNetGenerator
    from procedures.protection.apply import eps_scale
    from procedures.protection.whitebox import WhiteboxDisruption
    from scanDataset import ScanDataset

    cfg = config_mod.make_config("whitebox", models_dir=str(tiny_ctgan_models), eps_hu=50.0)
    assert cfg.whitebox_cube
    item = ScanDataset(tiny_data)[0]
    torch.manual_seed(0)
    G = UNetGenerator(slab=4, width=4, depth=2, out_init_std=0.1)
    wb = WhiteboxDisruption(cfg, torch.device("cpu"))
    s, called = 8, []

    def protect(starts):
        called.append(list(starts))
        return G(torch.stack([item.volume[t:t + 4] for t in starts]), scale=eps_scale(cfg, item))

    loss = wb.loss(_wb_slab(item, s, protect([s]), protect=protect))
    # z = s + 2 (slab middle); 2.5 mm slices: the cut is 13 slices, so z +- 7 = slices 3..17.
    assert called == [[8], [0, 4, 12, 16]]
    loss.backward()
    assert G.out.weight.grad.abs().sum() > 0
    cfg.whitebox_cube = False
    called.clear()
    one = wb.loss(_wb_slab(item, s, protect([s]), protect=protect))
    assert called == [[8]] and one.item() != pytest.approx(loss.item())
