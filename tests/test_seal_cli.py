"""verify.py and protect.py --seal: keys, every output format read back by the project and by
SimpleITK / pydicom, the tamper map, and bad input (docs/seal.md, docs/safety.md)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import protect
import verify
from helpers import assert_refused, call, phantom_scan, tree
from procedures.protection.seal import verify_volume
from utils.scan_io import load_scan, save_mhd

SHAPE = (10, 64, 64)


@pytest.fixture
def src(tmp_path) -> Path:
    p = tmp_path / "in" / "chest.mhd"
    p.parent.mkdir()
    save_mhd(phantom_scan(seed=4, shape=SHAPE), p)
    return p


@pytest.fixture
def key(tmp_path, capfd) -> Path:
    k = tmp_path / "keys" / "seal.key"
    k.parent.mkdir()
    res = call(verify.main, ["--make-key", k], capfd)
    assert res.rc == 0, res.err
    return k


def _seal(src, out, key, capfd, *extra) -> Path:
    res = call(protect.main, [src, "--seal", key, "-o", out, *extra], capfd)
    assert res.rc == 0 and not res.err.strip(), res.err
    return Path(res.out.split(" -> ")[1].split(" (")[0])


def test_make_key_is_private_and_never_overwritten(key, capfd):
    data = key.read_bytes()
    assert len(data) == 32 and (key.stat().st_mode & 0o777) == 0o600
    res = call(verify.main, ["--make-key", key], capfd)
    assert res.rc == 7 and "exists" in res.err and key.read_bytes() == data
    assert data.hex() not in res.out + res.err


def _third_party_hu(path: Path) -> np.ndarray:
    """HU as another program reads the file (not the project's readers)."""
    if path.is_dir():
        ds = [pydicom.dcmread(f) for f in sorted(path.iterdir())]
        ds.sort(key=lambda d: int(d.InstanceNumber))
        return np.stack([d.pixel_array.astype(np.int32) * int(float(d.RescaleSlope))
                         + int(float(d.RescaleIntercept)) for d in ds]).astype(np.int16)
    if path.suffix == ".npy":
        return np.load(path)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("out", ["s.mhd", "s.nrrd", "s.nii", "s.nii.gz", "s.npy", "dicom"])
def test_sealed_in_every_format_verifies_intact(src, key, tmp_path, capfd, out):
    extra = ["--format", "dicom"] if out == "dicom" else []
    written = _seal(src, tmp_path / "out" / (out if out != "dicom" else ""), key, capfd, *extra)
    original = load_scan(src).hu.astype(np.int32)
    res = call(verify.main, [written, "--key", key], capfd)
    assert res.rc == 0 and "intact" in res.out, res.out + res.err
    k = key.read_bytes()
    for hu in (load_scan(written).hu, _third_party_hu(written)):
        v = verify_volume(hu, k)
        assert v.intact and v.failed.sum() == 0
        assert np.abs(hu.astype(np.int32) - original).max() == 1      # the seal's 1 HU, no more


def _restore_dicom(folder: Path, intercept: int, slope: int = 1) -> None:
    """Re-store a series as unsigned pixels under another RescaleIntercept (and slope)."""
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        hu = (ds.pixel_array.astype(np.int32) * int(float(ds.RescaleSlope))
              + int(float(ds.RescaleIntercept)))
        stored = np.round((hu - intercept) / slope).astype(np.uint16)
        ds.PixelRepresentation = 0
        ds.RescaleIntercept, ds.RescaleSlope = str(intercept), str(slope)
        ds.PixelData = stored.tobytes()
        ds.save_as(f, enforce_file_format=True)


@pytest.mark.parametrize("intercept, slope, rc", [(-1024, 1, 0), (-1101, 1, 0), (-1024, 2, None)])
def test_dicom_rescale(src, key, tmp_path, capfd, intercept, slope, rc):
    """The seal is on the integer HU: any lossless re-storage (another intercept, unsigned
    pixels) keeps it; a slope of 2 drops the least significant bit, and is reported."""
    written = _seal(src, tmp_path / "out", key, capfd, "--format", "dicom")
    _restore_dicom(written, intercept, slope)
    res = call(verify.main, [written, "--key", key], capfd)
    assert res.exc is None and "Traceback" not in res.err
    if rc is not None:
        assert res.rc == rc, res.out + res.err
    else:
        assert res.rc in (10, 11, 12) and res.rc != 0


def test_seal_within_eps_of_a_perturbation(src, key, tmp_path, capfd, tiny_ctgan_models):
    """--targets with a 3 HU bound, then the seal: still within 3 HU of the original."""
    src = tmp_path / "deep" / "chest.mhd"  # CT-GAN's 32 mm cube must fit: 16 slices
    src.parent.mkdir()
    save_mhd(phantom_scan(seed=4, shape=(16,) + SHAPE[1:]), src)
    csv = tmp_path / "targets.csv"
    csv.write_text("filename,z,y,x\nchest.mhd,8,32,24\n")
    written = _seal(src, tmp_path / "out", key, capfd, "--targets", csv, "--eps", "3", "--models",
                    tiny_ctgan_models, "--targeted-steps", "2", "--no-progress", "--device", "cpu")
    hu, original = load_scan(written).hu.astype(np.int32), load_scan(src).hu
    assert np.abs(hu - original).max() <= 3 and (np.abs(hu - original) > 1).any()
    assert verify_volume(hu, key.read_bytes()).intact


def test_tampered_scan_map_and_png(src, key, tmp_path, capfd):
    written = _seal(src, tmp_path / "out", key, capfd)
    scan = load_scan(written)
    scan.hu = scan.hu.copy()
    scan.hu[3:6, 20:36, 30:40] += 25          # slices 3-5, blocks rows 2-4, columns 3-4
    scan.source_path = None
    t = tmp_path / "t" / "tampered.mhd"
    t.parent.mkdir()
    save_mhd(scan, t)
    res = call(verify.main, [t, "--key", key, "-o", tmp_path / "rep"], capfd)
    assert res.rc == 10 and res.exc is None, res.err
    assert "tampered: 1 region(s), 18 of" in res.out and "slices 3-5" in res.out
    assert "voxels z 3-5, y 16-39, x 24-39" in res.out
    import SimpleITK as sitk  # the map is not a CT (0/1 values): read it as any image

    m = sitk.ReadImage(str(tmp_path / "rep" / "tampered_tampermap.mhd"))
    np.testing.assert_allclose(m.GetSpacing()[::-1], scan.spacing)
    np.testing.assert_allclose(m.GetOrigin()[::-1], scan.origin)
    expect = np.zeros(SHAPE, np.int16)
    expect[3:6, 16:40, 24:40] = 1
    np.testing.assert_array_equal(sitk.GetArrayFromImage(m), expect)
    assert (tmp_path / "rep" / "tampered_tampermap.png").read_bytes()[:4] == b"\x89PNG"


def _sealed_ctx(src, key, tmp_path, capfd):
    written = _seal(src, tmp_path / "out", key, capfd)
    return written, tree(tmp_path)


def test_bad_inputs_are_one_line_with_distinct_codes(src, key, tmp_path, capfd):
    written, _ = _sealed_ctx(src, key, tmp_path, capfd)
    other = tmp_path / "keys" / "other.key"
    assert call(verify.main, ["--make-key", other], capfd).rc == 0
    loose = tmp_path / "keys" / "loose.key"
    loose.write_bytes(key.read_bytes())
    os.chmod(loose, 0o640)
    short = tmp_path / "keys" / "short.key"
    short.write_bytes(b"x" * 16)
    os.chmod(short, 0o600)
    truncated = tmp_path / "trunc" / "t.mhd"
    truncated.parent.mkdir()
    truncated.write_text(written.read_text())
    (truncated.parent / "s.raw").write_bytes(b"")
    truncated.write_text(written.read_text().replace("chest_protected.raw", "s.raw"))
    (truncated.parent / "s.raw").write_bytes(written.with_suffix(".raw").read_bytes()[:1000])
    out = tmp_path / "rep"
    cases = [([written, "--key", other, "-o", out], 12, ("another key",)),
             ([src, "--key", key, "-o", out], 11, ("no seal",)),
             ([truncated, "--key", key, "-o", out], 4, ("t.mhd", "s.raw")),
             ([written, "--key", loose, "-o", out], 14, ("loose.key",)),
             ([written, "--key", short, "-o", out], 14, ("short.key",)),
             ([written, "--key", tmp_path / "nokey", "-o", out], 3, ("nokey",)),
             ([written, "--key", key, "--block-size", "16", "-o", out], 13, ("8 x 8",)),
             ([written, "--key", key, "--block-size", "3"], 2, ("block size",)),
             (["--make-key", key], 7, ("seal.key",)),
             ([written], 2, ("--key",))]
    for argv, code, mention in cases:
        before = tree(tmp_path)
        res = call(verify.main, argv, capfd)
        assert_refused(res, code, mention, tmp_path, before)
        assert key.read_bytes().hex() not in res.out + res.err


def test_protect_refuses_a_loose_key_before_reading_the_scan(src, key, tmp_path, capfd):
    os.chmod(key, 0o644)
    before = tree(tmp_path)
    res = call(protect.main, [src, "--seal", key, "-o", tmp_path / "out"], capfd)
    assert_refused(res, 14, ("seal.key",), tmp_path, before)


def test_help_loads_no_torch():
    import subprocess
    import sys

    code = ("import sys, verify\nverify.main(['--help'])\n"
            "bad = [m for m in ('torch', 'tensorflow', 'scipy', 'matplotlib')\n"
            "       if m in sys.modules]\n"
            "sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(verify.__file__).parent)
    assert res.returncode == 0, res.stderr


def test_seal_after_the_generator(src, key, tmp_path, capfd, ckpt):
    """-c then --seal: the sealed scan is the generator's output changed by at most 1 HU."""
    plain = call(protect.main, [src, "-c", ckpt, "-o", tmp_path / "plain",
                                 "--no-progress", "--device", "cpu"], capfd)
    assert plain.rc == 0, plain.err
    written = _seal(src, tmp_path / "sealed", key, capfd, "-c", ckpt, "--no-progress",
                    "--device", "cpu")
    a = load_scan(tmp_path / "plain" / "chest_protected.mhd").hu.astype(np.int32)
    b = load_scan(written).hu
    assert np.abs(b - a).max() == 1 and (a != load_scan(src).hu).any()
    assert verify_volume(b, key.read_bytes()).intact


def test_a_float_scan_is_rounded_then_sealed(tmp_path, key, capfd):
    """Non-integer HU (a resampled scan): rounded to the nearest HU, then sealed (<= 1.5 HU)."""
    p = tmp_path / "f.mhd"
    s = phantom_scan(seed=4, shape=SHAPE)
    s.hu = s.hu.astype(np.float32) + 0.3
    save_mhd(s, p)
    written = _seal(p, tmp_path / "out", key, capfd)
    hu = load_scan(written).hu
    assert hu.dtype == np.int16 and np.abs(hu - s.hu).max() <= 1.5
    assert verify_volume(hu, key.read_bytes()).intact


def test_bench_seal_section_measures_both_steps(tmp_path, capfd):
    """bench.py --sections seal on a tiny phantom: both steps measured, written, no torch needed."""
    import json

    import bench

    res = call(bench.main, ["--sections", "seal", "--protect_slices", "4", "--size", "64",
                            "--out", tmp_path], capfd)
    assert res.rc == 0, res.err
    rows = json.loads((tmp_path / "seal_bench.json").read_text())
    assert [r["op"] for r in rows] == ["seal", "verify"]
    assert all(r["seconds"] >= 0 and r["rss_peak_mb"] > 0 for r in rows)
    assert "| seal | 4 x 64 x 64 int16 | 256 |" in res.out
