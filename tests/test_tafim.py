"""procedures.baselines.tafim: the TAFIM baseline (Aneja et al., ECCV 2022) trained through the PyTorch CT-GAN,
on tiny phantoms with tiny CT-GAN models."""
import csv
import json

import numpy as np
import pytest
import torch

import evaluate
from conftest import make_phantom
from procedures.baselines import tafim as T
from procedures.protection.apply import slabs_meeting
from scanDataset import ScanDataset
from utils.errors import ModelFileError, UsageError, run_cli
from utils.scan_io import Scan, save_mhd

SPACING = (2.5, 0.7, 0.7)
TINY = ["--width", "4", "--depth", "4", "--noise-size", "24", "--no-progress"]


def _cfg(**kw):
    base = dict(slab=4, width=4, depth=4, noise_size=24, seed=0)
    base.update(kw)
    return T.TafimConfig(**base).validate()


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return T.build_model(cfg)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    d = tmp_path_factory.mktemp("tafim_scans")
    for i in range(2):
        save_mhd(Scan(make_phantom((22, 48, 48), seed=i), SPACING, (0.0, 0.0, 0.0)), d / f"vol{i}.mhd")
    return d


# --- network and protection (no TensorFlow) ---------------------------------------------------
def test_unet_shapes_range_and_any_slice_size():
    m = T.TafimUNet(slab=3, width=4, depth=4, dropout=True, noise_size=16).eval()
    x = torch.rand(2, 3, 37, 50) * 2 - 1
    d = m.perturbation(x)
    assert d.shape == x.shape and d.abs().max() <= 1
    xp = m(x)
    assert xp.shape == x.shape and xp.min() >= -1 and xp.max() <= 1
    torch.testing.assert_close(xp, torch.clamp(x + d, -1, 1))
    assert m.noise_like(x).shape == (1, 3, 37, 50)               # 16x16 noise resized to the slice
    assert m.global_noise.shape == (3, 16, 16) and m.global_noise.requires_grad
    # The noise is an input: changing it changes the perturbation.
    with torch.no_grad():
        m.global_noise.add_(0.5)
    assert not torch.allclose(m.perturbation(x), d)
    with pytest.raises(UsageError, match="slabs of 3"):
        m(torch.zeros(1, 4, 32, 32))
    # TAFIM's unet_64: 6 down-convolutions, ngf 64 -> 64..512 channels; dropout on level 4 only.
    big = T.TafimUNet()
    assert [c.out_channels for c in big.down] == [64, 128, 256, 512, 512, 512]
    assert [type(d).__name__ for d in big.up_drop] == ["Identity"] * 4 + ["Dropout", "Identity"]


def test_slab_tiling_for_the_cube_and_overlap_order():
    assert slabs_meeting(22, 4, 5, 18) == [4, 8, 12, 16]        # tiling 0, 4, ..., 16, 18
    assert slabs_meeting(22, 4, 5, 19) == [4, 8, 12, 16, 18]    # last slab aligned to the end
    xp = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4, 1, 1).expand(3, 4, 2, 2)
    sub, z0 = T._assemble(xp, [12, 16, 18])
    assert z0 == 12 and sub.shape == (10, 2, 2)
    # slices 12..15 from slab 0, 16..17 from slab 1, 18..21 from slab 2 (the later slab wins)
    assert sub[:, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]


def test_protect_hu_covers_every_slice_and_is_batch_independent():
    hu = make_phantom((10, 40, 40), seed=2)
    m = _model(_cfg())
    a = T.protect_hu(m, hu, batch=1, out=np.empty(hu.shape, np.int16))
    b = T.protect_hu(m, hu, batch=3)
    assert a.dtype == np.int16 and b.dtype == np.float32 and a.shape == hu.shape
    np.testing.assert_array_equal(a, np.clip(np.rint(b), -32768, 32767))
    assert all(np.any(a[z] != hu[z]) for z in range(hu.shape[0]))   # slices 8, 9: the aligned slab
    # Slab by slab with the volume's own min-max, as in training.
    lo, hi = float(hu.min()), float(hu.max())
    x = torch.from_numpy((hu[6:10].astype(np.float64) - lo) / (hi - lo) * 2 - 1).float()[None]
    with torch.no_grad():
        want = (m(x)[0].double().numpy() + 1) / 2 * (hi - lo) + lo
    np.testing.assert_allclose(b[6:10], want, atol=1e-3)


def test_targets_and_config_errors():
    assert T.parse_target("0") == ("norm", 0.0)
    assert T.parse_target("-850HU") == ("hu", -850.0)
    assert T.parse_target("lung") == ("lung", None)
    for bad in ("2", "grey", "hu"):
        with pytest.raises(UsageError, match="--target"):
            T.parse_target(bad)
    with pytest.raises(UsageError, match="depth"):
        T.TafimConfig(depth=1).validate()


def test_cli_errors_are_one_line(scans, tmp_path, capsys):
    rc = run_cli(T.main, ["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 3 and err.count("\n") == 1 and "data folder not found" in err
    rc = run_cli(T.main, ["--data", str(scans), "--models", str(tmp_path / "nomodels"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == ModelFileError.exit_code and err.count("\n") == 1 and "nomodels/INJ" in err
    rc = run_cli(T.main, ["--target", "bright"])
    assert rc == UsageError.exit_code and "--target 'bright'" in capsys.readouterr().err
    rc = run_cli(T.main, ["--steps", "0"])
    assert rc == UsageError.exit_code
    assert not (tmp_path / "o").exists()


def test_checkpoint_round_trip_and_refusals(tmp_path):
    from utils.checkpoint import save_checkpoint

    cfg = _cfg(slab=2)
    m = _model(cfg, seed=3)
    with torch.no_grad():
        m.global_noise.mul_(0.3)
    path = tmp_path / "t.pt"
    save_checkpoint(path, T.checkpoint_state(m, cfg, step=7))
    assert set(torch.load(path, weights_only=True)) >= {"kind", "config", "model", "step"}
    m2, cfg2, state = T.load_tafim(path)
    assert cfg2 == cfg and state["step"] == 7
    hu = make_phantom((7, 32, 32), seed=5)
    np.testing.assert_array_equal(T.protect_hu(m, hu), T.protect_hu(m2, hu))
    # Not a TAFIM checkpoint, or one whose weights do not fit its config: one-line errors.
    torch.save({"generator": {}, "config": {}}, tmp_path / "mits.pt")
    with pytest.raises(ModelFileError, match="not a TAFIM checkpoint"):
        T.load_tafim(tmp_path / "mits.pt")
    st = T.checkpoint_state(m, cfg, 0)
    st["config"]["width"] = 8
    torch.save(st, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match="TAFIM model does not fit"):
        T.load_tafim(tmp_path / "bad.pt")


# --- through CT-GAN (tiny Keras models, read with h5py) ----------------------------------------
@pytest.fixture(scope="module")
def objective_parts(scans, tiny_ctgan_models):
    items = [ScanDataset(scans)[i] for i in range(2)]
    return items, tiny_ctgan_models


@pytest.mark.tf
def test_gradient_reaches_the_unet_only_through_ctgan(objective_parts):
    items, models = objective_parts
    cfg = _cfg(perturb_weight=0.0, global_term=False)              # loss = MSE(M(protected), target)
    obj = T.TafimObjective.from_model_dirs(models, cfg)
    m = _model(cfg)
    item = items[0]
    loss, parts = obj.loss(m, item, (11, 24, 34), "inject")
    assert parts["slabs"] == 4 and parts["recon"] > 0                # cube z 5..17 -> slabs 4, 8, 12, 16
    loss.backward()
    for p in (m.down[0].weight, m.up[0].bias, m.global_noise):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for g in obj.tamper.generators.values():                         # the attacker stays frozen
        assert all(p.grad is None and not p.requires_grad for p in g.parameters())
    # The loss is CT-GAN's output: another injector gives another loss for the same protection.
    with torch.no_grad():
        obj.tamper.generators["inject"].g_out.bias.add_(0.3)
        other, _ = obj.loss(m, item, (11, 24, 34), "inject")
        obj.tamper.generators["inject"].g_out.bias.sub_(0.3)
    assert abs(other.item() - loss.item()) > 1e-4
    # The target is uniform in normalised units; a HU target is mapped with the volume's range.
    obj_hu = T.TafimObjective(obj.tamper, _cfg(target="-850hu"))
    span = item.hu_max - item.hu_min
    assert obj_hu.target_norm(item) == pytest.approx((-850 - item.hu_min) / span * 2 - 1)
    assert T.TafimObjective(obj.tamper, _cfg(target="lung")).target_norm(item) < obj_hu.target_norm(item) + 0.1


@pytest.mark.tf
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(objective_parts):
    items, models = objective_parts
    cfg = _cfg(lr=1e-3)
    obj = T.TafimObjective.from_model_dirs(models, cfg)
    m = _model(cfg)
    opt = torch.optim.Adam(m.parameters(), lr=cfg.lr)
    losses, perturbs = [], []
    for _ in range(6):
        loss, parts = obj.loss(m, items[1], (11, 20, 14), "remove")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["loss"])
        perturbs.append(parts["perturb"])
    final, parts = obj.loss(m, items[1], (11, 20, 14), "remove")
    losses.append(final.item())
    # Every step lowers the whole TAFIM loss (both terms, the net's and the global noise's).
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.04, losses
    assert parts["perturb"] < 0.5 * perturbs[0]


@pytest.mark.tf
def test_cli_trains_seeded_resumes_and_feeds_evaluate(scans, tiny_ctgan_models, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--data", str(scans), "--models", str(tiny_ctgan_models), "--out", str(out), *TINY]
    assert run_cli(T.main, base + ["--steps", "2"]) == 0
    assert run_cli(T.main, base + ["--steps", "3", "--resume"]) == 0
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    straight = tmp_path / "straight"
    assert run_cli(T.main, [*base[:4], "--out", str(straight), *TINY, "--steps", "3"]) == 0
    once = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == once["step"] == 3
    assert [h["action"] for h in once["history"]] == ["inject", "remove", "inject"]
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in once["history"]])
    for k in once["model"]:
        torch.testing.assert_close(resumed["model"][k], once["model"][k], rtol=1e-5, atol=1e-6)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps_done"] == 3 and summary["seconds_per_step"] > 0
    # A resume with another network is refused.
    rc = run_cli(T.main, base[:6] + ["--width", "8", "--depth", "4", "--noise-size", "24",
                                     "--steps", "4", "--resume", "--no-progress"])
    assert rc == UsageError.exit_code and "width=4" in capsys.readouterr().err

    # evaluate.py: the "tafim" method yields its protected and tampered columns.
    ev = tmp_path / "eval"
    rc = run_cli(evaluate.main, ["--data", str(scans), "--models", str(tiny_ctgan_models), "--out", str(ev),
                                 "--methods", "tafim", "--tafim-checkpoint", str(straight / "checkpoint.pt"),
                                 "-n", "1", "--max-scans", "1", "--no-progress", "--no-figures"])
    assert rc == 0, capsys.readouterr().err
    md = (ev / "results.md").read_text()
    assert md.count("protected TAFIM (width 4, slab 4, 3 steps)") >= 2
    assert md.count("tampered TAFIM (width 4, slab 4, 3 steps)") >= 2
    rows = list(csv.DictReader(open(ev / "results.csv")))
    assert {(r["kind"], r["method"]) for r in rows} == {("protected", "tafim"), ("tampered", "tafim"),
                                                       ("tampered", "none")}
    prot = [r for r in rows if r["kind"] == "protected" and r["region"] == "slice"]
    assert all(float(r["rmse"]) > 0 for r in prot)
    doc = json.loads((ev / "results.json").read_text())
    assert doc["perturbation"][0]["method"] == "tafim" and doc["perturbation"][0]["rms_hu"] > 0


def test_importing_tafim_loads_neither_the_evaluation_nor_an_attacker():
    """TAFIM is a method the evaluation uses, not the other way round: its modules import
    without the evaluation harness, Keras or TensorFlow (procedures/baselines/tafim.py)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, procedures.baselines.tafim as T; "
            "print(sorted(m for m in sys.modules if m.startswith('procedures.evaluation') "
            "or m in ('evaluate', 'keras', 'tensorflow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
