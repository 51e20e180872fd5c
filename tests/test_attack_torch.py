"""procedures.attacker.torch_attacker: CT-GAN's black-box attacker in torch equals the Keras/NumPy pipeline
(procedures.attacker.pipeline) with tiny random generators, on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import config as config_mod
from conftest import make_phantom
from procedures.attacker.pipeline import AttackShapeError, ScanManipulator
from procedures.attacker.torch_attacker import TorchScanManipulator, attacker_impl, blackbox_attacker
from procedures.protection.disruption import DisruptionTarget
from utils.errors import ModelFileError, UsageError

SPACING = (2.5, 0.7, 0.7)
# Stated tolerance: the generators are float32 in both (Keras vs the PyTorch port, summed in
# another order) and the de-equalisation can amplify their last bits where the equaliser's cdf
# is steep; everything else is float64 in both. Measured on the real models/INJ, REM at lung1
# (z2.5): max 1.7 HU, 99.9% of changed voxels within 0.02 HU (docs/performance.md).
MAX_HU, Q999_HU = 2.0, 0.05


def _vol(shape=(60, 96, 96), seed=1):
    return make_phantom(shape, seed=seed).astype(np.float32)


@pytest.fixture(scope="module")
def pair(tiny_ctgan_models):
    return ScanManipulator(tiny_ctgan_models), TorchScanManipulator(tiny_ctgan_models)


@pytest.mark.tf
@pytest.mark.parametrize("action", ["inject", "remove"])
@pytest.mark.parametrize("center", [(30, 48, 66),      # right lung, inside
                                    (2, 10, 90),       # both cubes leave the scan
                                    (30, 41, 26)])     # the copy-noise block meets the tamper
def test_equals_the_keras_pipeline(pair, action, center):
    keras_man, torch_man = pair
    hu = _vol()
    a, b = hu.copy(), hu.copy()
    sa = keras_man.tamper_volume(a, SPACING, center, action)
    sb = torch_man.tamper_volume(b, SPACING, center, action)
    assert sa == sb
    assert np.all(a[~_mask(a.shape, sa)] == hu[~_mask(a.shape, sa)])
    assert np.all(b[~_mask(b.shape, sb)] == hu[~_mask(b.shape, sb)])
    changed = a != hu
    assert changed.sum() > 1000                      # a real tamper to compare
    diff = np.abs(a.astype(np.float64) - b)
    assert diff.max() <= MAX_HU and np.quantile(diff[sa], 0.999) <= Q999_HU, (diff.max(), np.quantile(diff[sa], 0.999))


def _mask(shape, sl):
    m = np.zeros(shape, bool)
    m[sl] = True
    return m


def test_a_tensor_volume_stays_a_tensor_and_equals_the_numpy_one(pair):
    _, torch_man = pair
    hu = _vol()
    a = hu.copy()
    t = torch.from_numpy(hu.copy())
    sa = torch_man.tamper_volume(a, SPACING, (30, 48, 66), "inject")
    st = torch_man.tamper_volume(t, SPACING, (30, 48, 66), "inject")
    assert sa == st and isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), a)


def test_published_zoom_and_bad_input(pair, tiny_ctgan_models):
    _, torch_man = pair
    published = TorchScanManipulator(tiny_ctgan_models, exact_resample=False)
    with pytest.raises(AttackShapeError, match="cannot"):   # 5 mm: the published zoom fails
        published.tamper_volume(_vol((20, 96, 96)), (5.0, 0.7, 0.7), (10, 48, 66), "inject")
    with pytest.raises(UsageError, match="float"):
        torch_man.tamper_volume(make_phantom((60, 96, 96)), SPACING, (30, 48, 66), "inject")
    with pytest.raises(ModelFileError, match="model folder not found"):
        TorchScanManipulator(tiny_ctgan_models / "nowhere").model("inject")


def test_config_chooses_the_attacker(tiny_ctgan_models):
    cfg = config_mod.make_config("paper", models_dir=str(tiny_ctgan_models), device="cpu")
    assert attacker_impl(cfg) == "keras"                  # auto on the CPU
    torch_cfg = config_mod.make_config("paper", models_dir=str(tiny_ctgan_models), device="cpu",
                                       attacker_impl="torch")
    assert isinstance(DisruptionTarget(torch_cfg).attacker, TorchScanManipulator)
    ref = config_mod.make_config("reference", models_dir=str(tiny_ctgan_models), device="cpu")
    assert attacker_impl(ref) == "keras"
    with pytest.raises(UsageError, match="published"):
        blackbox_attacker(config_mod.make_config("reference", attacker_impl="torch", device="cpu"))
    with pytest.raises(UsageError):
        config_mod.make_config("paper", attacker_impl="jax")


@pytest.mark.tf
def test_disruption_target_is_the_same_with_either_attacker(tiny_ctgan_models):
    """T of one eligible sub-batch (the paper preset's black box) from both attackers."""
    from scanDataset import ScanDataset
    from utils.scan_io import Scan, save_mhd

    d = tiny_ctgan_models.parent / "dt_scans"
    d.mkdir(exist_ok=True)
    save_mhd(Scan(make_phantom((72, 96, 96), seed=3), SPACING, (0.0, 0.0, 0.0)), d / "v.mhd")
    item = ScanDataset(d)[0]
    x_p = np.clip((item.scan.hu[36:40] - item.hu_min) / (item.hu_max - item.hu_min) * 2 - 1 + 0.01, -1, 1)
    T = {}
    for impl in ("keras", "torch"):
        cfg = config_mod.make_config("paper", models_dir=str(tiny_ctgan_models), device="cpu",
                                     attacker_impl=impl)
        T[impl] = DisruptionTarget(cfg).target(item, 36, x_p, 0, np.random.default_rng(5))
    assert T["keras"] is not None and T["torch"] is not None
    span = item.hu_max - item.hu_min        # T is in [-1, 1] by one min-max of the slab: HU / span * 2
    assert np.abs(T["keras"] - T["torch"]).max() * span / 2 <= MAX_HU


@pytest.mark.tf
def test_tamper_cli_torch_path_equals_keras(tiny_ctgan_models, tmp_path, capsys):
    """tamper.py --impl torch (a GPU's default) writes the scan --impl keras writes, within the
    tolerance plus int16 rounding; the Gaussian-noise mode is Keras only."""
    import tamper
    from utils.errors import run_cli
    from utils.scan_io import Scan, load_scan, save_mhd

    src = tmp_path / "chest.mhd"
    hu = make_phantom((60, 96, 96), seed=2)
    save_mhd(Scan(hu, SPACING, (0.0, 0.0, 0.0)), src)
    got = {}
    for impl in ("keras", "torch"):
        argv = ["-t", str(src), "-d", str(tmp_path / impl), "-a", "remove", "-c", "30,48,66", "-c", "20,40,30",
                "--models", str(tiny_ctgan_models), "--impl", impl, "--device", "cpu"]
        assert run_cli(tamper.main, argv) == 0
        got[impl] = load_scan(tmp_path / impl / "chest_tampered.mhd").hu
    capsys.readouterr()
    assert np.sum(got["keras"] != hu) > 1000
    assert np.abs(got["keras"].astype(np.int32) - got["torch"]).max() <= MAX_HU + 1
    rc = run_cli(tamper.main, ["-t", str(src), "-d", str(tmp_path / "g"), "-a", "inject", "-c", "30,48,66",
                               "--models", str(tiny_ctgan_models), "--impl", "torch", "--noise", "gaussian"])
    assert rc != 0 and "copy-noise" in capsys.readouterr().err


def test_the_torch_attacker_needs_no_tensorflow_or_keras(tiny_ctgan_models):
    """What a GPU machine without TensorFlow runs (make gpu-check): load, tamper, no Keras."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from procedures.attacker.torch_attacker import TorchScanManipulator\n"
            "from utils.phantom import phantom\n"
            f"m = TorchScanManipulator({str(tiny_ctgan_models)!r})\n"
            "v = phantom((40, 64, 64)).astype(np.float32)\n"
            "m.tamper_volume(v, (2.5, 0.7, 0.7), (20, 32, 46), 'inject')\n"
            "bad = [k for k in ('tensorflow', 'keras') if k in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
