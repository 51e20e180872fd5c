"""protect.py: protect real and synthetic scans with a tiny MITS-GAN checkpoint from train.py."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import protect
from conftest import make_phantom
from helpers import make_tiny_checkpoint
from procedures.protection.apply import load_generator, protect_hu, protect_volume
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import ModelFileError
from utils.scan_io import Scan, load_scan, save_mhd

SPACING = (2.5, 0.7, 0.7)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def phantom_scan(tmp_path):
    p = tmp_path / "in" / "chest.mhd"
    p.parent.mkdir()
    save_mhd(Scan(make_phantom((22, 40, 40), seed=3), SPACING, (5.0, -3.0, 2.0)), p)
    return p


def _digest(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def run(argv, capsys):
    from utils.errors import run_cli
    rc = run_cli(protect.main, argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.realdata
def test_real_scan_round_trip_keeps_geometry(ckpt, real_data_dir, tmp_path, capsys):
    src = real_data_dir / "lung1.mhd"
    before = _digest(src, src.with_suffix(".raw"))
    rc, out, err = run([str(src), "-c", str(ckpt), "-o", str(tmp_path), "--no-progress"], capsys)
    assert rc == 0, err
    written = tmp_path / "lung1_protected.mhd"
    a, b = load_scan(src), load_scan(written)
    assert b.hu.shape == a.hu.shape and b.hu.dtype == a.hu.dtype == np.int16
    np.testing.assert_array_equal(b.spacing, a.spacing)
    np.testing.assert_array_equal(b.origin, a.origin)
    np.testing.assert_array_equal(b.direction, a.direction)
    diff = b.hu.astype(np.float64) - a.hu
    assert np.abs(diff).max() > 0
    # The printed perturbation is the written one.
    rms = float(out.split("RMS ")[1].split(" HU")[0])
    mx = float(out.split("max ")[1].split(" HU")[0])
    assert rms == pytest.approx(np.sqrt(np.mean(diff ** 2)), abs=0.01)
    assert mx == pytest.approx(np.abs(diff).max(), abs=0.1)
    assert _digest(src, src.with_suffix(".raw")) == before  # input untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lung1_protected.mhd", "lung1_protected.raw"]


def test_dicom_output_and_batch_size_independence(ckpt, phantom_scan, tmp_path, capsys):
    rc, _, err = run([str(phantom_scan), "-c", str(ckpt), "-o", str(tmp_path / "a.mhd"), "--batch", "1",
                      "--no-progress"], capsys)
    assert rc == 0, err
    rc, _, err = run([str(phantom_scan), "-c", str(ckpt), "-o", str(tmp_path / "b.mhd"), "--batch", "3",
                      "--no-progress"], capsys)
    assert rc == 0, err
    a, b = load_scan(tmp_path / "a.mhd"), load_scan(tmp_path / "b.mhd")
    # The noise delta is drawn per slab, not per batch: only float32 arithmetic of other batch
    # shapes can move a value across a rounding boundary.
    step = np.abs(a.hu.astype(np.int32) - b.hu)
    assert step.max() <= 1 and np.mean(step > 0) < 1e-3
    rc, _, err = run([str(phantom_scan), "-c", str(ckpt), "-o", str(tmp_path / "c.mhd"), "--seed", "7",
                      "--no-progress"], capsys)
    assert rc == 0
    assert not np.array_equal(load_scan(tmp_path / "c.mhd").hu, a.hu)
    # DICOM output: a series folder that reads back with the same HU and geometry.
    rc, out, err = run([str(phantom_scan), "-c", str(ckpt), "-o", str(tmp_path / "dcm"), "--format", "dicom",
                        "--batch", "1", "--no-progress"], capsys)
    assert rc == 0, err
    series = tmp_path / "dcm" / "chest_protected"
    d = load_scan(series)
    assert len(list(series.glob("*.dcm"))) == 22
    np.testing.assert_array_equal(d.hu, a.hu)
    np.testing.assert_allclose(d.spacing, a.spacing)
    np.testing.assert_allclose(d.origin, a.origin)


def test_protect_hu_streams_into_int16_like_protect_volume(ckpt):
    from scanDataset import ScanDataset

    G, cfg, dtype = load_generator(ckpt)
    item = ScanDataset(Path(ckpt).parent.parent / "scans")[0]
    ref = protect_volume(G, item, cfg, "cpu", dtype, seed=3, batch=2)   # train.py's path: float64
    assert ref.dtype == np.float64 and ref.shape == item.scan.hu.shape
    out = np.empty(item.scan.hu.shape, np.int16)
    protect_hu(G, item.scan.hu, cfg, "cpu", dtype=dtype, seed=3, batch=2, out=out)
    np.testing.assert_array_equal(out, np.clip(np.rint(ref), -32768, 32767).astype(np.int16))


def test_missing_checkpoint_is_one_line(phantom_scan, tmp_path, capsys):
    rc, out, err = run([str(phantom_scan), "-c", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o")], capsys)
    assert rc == ModelFileError.exit_code
    assert err.strip().count("\n") == 0 and "nope.pt: checkpoint not found" in err
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_another_architecture_is_one_line(ckpt, phantom_scan, tmp_path, capsys):
    state = load_checkpoint(ckpt)
    for change in ({"g_width": 8}, {"generator": "published"}):
        bad = dict(state, config={**state["config"], **change})
        p = tmp_path / f"bad_{list(change)[0]}.pt"
        save_checkpoint(p, bad)
        rc, out, err = run([str(phantom_scan), "-c", str(p), "-o", str(tmp_path / "o")], capsys)
        assert rc == ModelFileError.exit_code, err
        assert err.startswith("error: ") and err.strip().count("\n") == 0
        assert "generator weights do not match" in err
        assert not (tmp_path / "o").exists()
    # Not a MITS-GAN checkpoint at all (a plain state dict).
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    rc, _, err = run([str(phantom_scan), "-c", str(tmp_path / "other.pt")], capsys)
    assert rc == ModelFileError.exit_code and "not a MITS-GAN checkpoint" in err


def test_refuses_to_overwrite_the_input(ckpt, phantom_scan, capsys):
    before = _digest(phantom_scan, phantom_scan.with_suffix(".raw"))
    rc, _, err = run([str(phantom_scan), "-c", str(ckpt), "-o", str(phantom_scan)], capsys)
    assert rc == 7 and "refusing to overwrite" in err and err.strip().count("\n") == 0
    assert _digest(phantom_scan, phantom_scan.with_suffix(".raw")) == before


def test_refuses_to_write_inside_an_input_dicom_folder(ckpt, phantom_scan, tmp_path, capsys):
    from utils.scan_io import save_dicom_series

    series = save_dicom_series(load_scan(phantom_scan), tmp_path / "series")
    n = len(list(series.iterdir()))
    rc, _, err = run([str(series), "-c", str(ckpt), "-o", str(series)], capsys)
    assert rc == 7 and "inside the input DICOM folder" in err
    assert len(list(series.iterdir())) == n


def _unet(width: int, seed: int = 0):
    """A randomly initialised U-Net generator (default preset) with a non-zero perturbation."""
    import config as config_mod
    from generator import build_generator

    cfg = config_mod.make_config("whitebox", g_width=width)
    torch.manual_seed(seed)
    G = build_generator(cfg).eval()
    torch.nn.init.normal_(G.out.weight, 0.0, 0.02)
    return G, cfg


def test_copy_path_keeps_no_graph_and_equals_the_direct_path():
    """An `out` torch cannot view (big-endian, Fortran order) takes the device branch's copy path:
    it raised "Can't call numpy() on Tensor that requires grad" while G ran with autograd on
    (the CUDA crash of evaluate.py)."""
    G, cfg = _unet(4)
    hu = make_phantom((10, 32, 32), seed=1)
    direct = protect_hu(G, hu, cfg, "cpu", seed=2, batch=2, out=np.empty(hu.shape, np.float32))
    assert np.any(direct != hu)
    for out in (np.empty(hu.shape, ">f4"), np.asfortranarray(np.empty(hu.shape, np.float32))):
        got = protect_hu(G, hu, cfg, "cpu", seed=2, batch=2, out=out)
        assert got is out
        np.testing.assert_array_equal(got, direct)


def test_peak_memory_does_not_grow_with_the_number_of_slices():
    """Each batch's activations are freed after the batch: protecting 12x more slices needs no
    more memory than the scan itself (the in-place writes into `out` used to chain every batch's
    autograd graph: 19 GB for a 95-slice scan at width 32)."""
    from procedures.benchmarking.measure import Memory

    G, cfg = _unet(16)
    growth = {}
    for depth in (8, 96, 8):   # the small scan twice: allocator warm-up does not count
        hu = make_phantom((depth, 96, 96))
        with Memory(torch.device("cpu")) as mem:
            protect_hu(G, hu, cfg, "cpu", batch=2, out=np.empty_like(hu))
        growth[depth] = mem.result["rss_growth_mb"]
    # the 96-slice scan and its output are 3.4 MB; one batch of activations ~15 MB
    assert growth[96] < growth[8] + 16, growth


def test_noise_on_a_gpu_is_the_cpu_noise():
    """slab_noise's device (int64) and CPU (uint32) hashes give the same bits, keys at the edges
    of 32 bits included."""
    from procedures.protection.apply import _noise_numpy, _noise_torch, _slab_keys

    keys = np.concatenate([_slab_keys(7, [0, 4, 96]),
                           np.array([[0, 0], [0xFFFFFFFF, 0xFFFFFFFF], [0x80000000, 1]], np.uint32)])
    n = 3 * 40 * 40 + 5
    got = _noise_torch(keys, n, "cpu").numpy()
    np.testing.assert_array_equal(got, _noise_numpy(keys, n))
    assert 0 <= got.min() and got.max() < 1 and 0.45 < got.mean() < 0.55


def test_scan_stem_drops_every_scan_suffix():
    from utils.scan_paths import scan_stem

    for name in ("a.mhd", "a.nii.gz", "a.NRRD", "a.npy", "dir/a.mha"):
        assert scan_stem(name) == "a"
    assert scan_stem("series_folder") == "series_folder"
