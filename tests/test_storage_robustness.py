"""Protection must survive int16 HU storage (MetaImage and DICOM round trips)."""
import numpy as np
import pytest
import torch

import config as config_mod
from conftest import make_phantom
from generator import UNetGenerator
from procedures.protection.apply import protect_hu, scan_with_hu
from utils.scan_io import Scan, load_scan, save_dicom_series, save_mhd


@pytest.mark.parametrize("fmt", ["mhd", "dicom"])
def test_quantised_round_trip_keeps_perturbation_within_half_hu(fmt, tmp_path):
    cfg = config_mod.make_config("whitebox", g_width=4, eps_hu=8.0)
    torch.manual_seed(0)
    G = UNetGenerator(slab=4, width=4, depth=2)
    torch.nn.init.normal_(G.out.weight, 0, 0.5)  # a real, bounded, non-zero perturbation
    src = Scan(make_phantom((12, 32, 32)), (2.5, 0.7, 0.7), (0.0, 0.0, 0.0))
    float_hu = protect_hu(G, src.hu, cfg, "cpu", out=np.empty(src.hu.shape, np.float64))
    pert = float_hu - src.hu
    assert 1.0 < np.abs(pert).max() <= 8.0 + 1e-6  # bounded by eps, and not trivially small
    scan = scan_with_hu(src, float_hu)
    path = tmp_path / ("p.mhd" if fmt == "mhd" else "p_dicom")
    (save_mhd if fmt == "mhd" else save_dicom_series)(scan, path)
    stored = load_scan(path).hu.astype(np.float64)
    assert np.abs((stored - src.hu) - pert).max() <= 0.5
