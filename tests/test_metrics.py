"""utils.metrics against hand-computed values and skimage; LPIPS plumbing with fake weights."""
import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from helpers import fake_lpips_state
from utils import metrics as M
from utils.errors import ModelFileError


def test_rmse_hand_computed():
    a = np.array([[0.0, 10.0], [20.0, -1000.0]])
    b = np.array([[3.0, 6.0], [20.0, -1000.0]])
    assert M.rmse(a, b) == pytest.approx(math.sqrt((9 + 16) / 4))
    assert M.rmse(a, a) == 0.0
    with pytest.raises(ValueError, match="shape"):
        M.rmse(a, b[:1])


def test_psnr_window_hand_computed_and_matches_skimage():
    real = np.full((8, 8), -500.0)
    test = real + 14.0                                    # MSE 196 inside the window
    want = 10 * math.log10(1400.0 ** 2 / 196.0)
    assert M.psnr(real, test) == pytest.approx(want)
    assert M.psnr(real, test) == pytest.approx(peak_signal_noise_ratio(real, test, data_range=1400))
    assert M.psnr(real, real) == math.inf


def test_psnr_clips_to_the_window():
    real = np.full((4, 4), 1000.0)                        # bone: above the lung window's 400
    test = real + 500.0
    assert M.psnr(real, test) == math.inf                 # both clip to 400: identical in window
    assert M.psnr(real, test, window=(-1000, 3000)) == pytest.approx(
        10 * math.log10(4000.0 ** 2 / 500.0 ** 2))


def test_psnr_image_range_uses_the_real_images_own_range():
    rng = np.random.default_rng(0)
    real = rng.uniform(-1000, 200, (16, 16))
    test = real + rng.normal(0, 20, real.shape)
    peak = real.max() - real.min()
    mse = np.mean((real - test) ** 2)
    assert M.psnr_image_range(real, test) == pytest.approx(10 * math.log10(peak ** 2 / mse))


def test_ssim_matches_skimage_on_clipped_hu():
    rng = np.random.default_rng(1)
    real = rng.uniform(-1200, 800, (32, 32))
    test = real + rng.normal(0, 50, real.shape)
    want = structural_similarity(np.clip(real, -1000, 400), np.clip(test, -1000, 400), data_range=1400)
    assert M.ssim(real, test) == pytest.approx(want)
    assert M.ssim(real, real) == pytest.approx(1.0)
    assert M.ssim(real[:5, :5], test[:5, :5]) <= 1.0      # small images: smaller odd window
    assert math.isnan(M.ssim(real[:2, :2], test[:2, :2]))


def test_perturbation_stats_chunked():
    a = np.zeros((5, 4, 4), np.int16)
    b = a.copy()
    b[2, 1, 1] = 40
    b[4, 0, 0] = -30
    st = M.perturbation_stats(b, a, chunk=2)
    assert st["rms_hu"] == pytest.approx(math.sqrt((40 ** 2 + 30 ** 2) / a.size))
    assert st["max_hu"] == 40.0
    assert st["changed_fraction"] == pytest.approx(2 / a.size)


# --- LPIPS -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_lpips_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("lpips") / "fake_lpips_alex.pt"
    torch.save(fake_lpips_state(), p)
    return p


def test_lpips_plumbing_with_fake_weights(fake_lpips_file):
    model = M.load_lpips(fake_lpips_file)
    rng = np.random.default_rng(0)
    a = rng.uniform(-1000, 400, (64, 64))
    b = a + rng.normal(0, 80, a.shape)
    assert M.lpips_hu(model, a, a) == pytest.approx(0.0, abs=1e-7)     # LPIPS(x, x) = 0
    d = M.lpips_hu(model, a, b)
    assert d > 0 and math.isfinite(d)
    assert M.lpips_hu(model, b, a) == pytest.approx(d, rel=1e-5)        # symmetric
    # Outside the window both clip to the same value: distance 0.
    assert M.lpips_hu(model, np.full((40, 40), 800.0), np.full((40, 40), 2000.0)) == pytest.approx(0, abs=1e-7)
    # Squares smaller than AlexNet's minimum are upsampled rather than failing.
    assert M.lpips_hu(model, a[:20, :20], b[:20, :20]) > 0


def test_lpips_loads_lpips_module_keys_and_split_folder(tmp_path, fake_lpips_file):
    sd = fake_lpips_state()
    ref = M.load_lpips(fake_lpips_file)
    a = np.random.default_rng(1).uniform(-1000, 400, (48, 48))
    b = a[::-1].copy()
    want = M.lpips_hu(ref, a, b)
    # the state dict of an lpips.LPIPS(net="alex") module
    slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    mod = {(f"net.slice{slices[int(k.split('.')[1])]}.{k.split('.', 1)[1]}" if k.startswith("features.") else k): v
           for k, v in sd.items()}
    mod["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    torch.save(mod, tmp_path / "lpips_module.pt")
    assert M.lpips_hu(M.load_lpips(tmp_path / "lpips_module.pt"), a, b) == pytest.approx(want, rel=1e-6)
    # a folder holding a torchvision AlexNet file and lpips' alex.pth
    d = tmp_path / "split"
    d.mkdir()
    torch.save({k: v for k, v in sd.items() if not k.startswith("lin")}, d / "alexnet-owt-7be5be79.pth")
    torch.save({k: v for k, v in sd.items() if k.startswith("lin")}, d / "alex.pth")
    assert M.lpips_hu(M.load_lpips(d), a, b) == pytest.approx(want, rel=1e-6)


def test_lpips_bad_weights_are_one_line_model_file_errors(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        M.load_lpips(tmp_path / "missing.pt")
    sd = fake_lpips_state()
    del sd["lin3.model.1.weight"]
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(ModelFileError, match="lack lin3"):
        M.load_lpips(tmp_path / "partial.pt")
    sd = fake_lpips_state()
    sd["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    torch.save(sd, tmp_path / "wrong.pt")
    with pytest.raises(ModelFileError, match="features.3.weight has shape"):
        M.load_lpips(tmp_path / "wrong.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match="not a loadable") as e:
        M.load_lpips(tmp_path / "junk.pt")
    assert "\n" not in str(e.value)
