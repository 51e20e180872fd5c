"""Hostile and malformed scans: nothing lost, nothing read that should not be.

A second corpus beside test_bad_inputs.py's: headers that name files outside their folder,
outputs named like the input's data file, series folders with stray or broken files, lying
voxel types, geometry that cannot be CT, resource bombs in every format. Each case runs
through tamper.py and GUI.py (both read the scan before anything else) in the default suite,
and through protect.py, train.py and evaluate.py in the slow suite. Every run must end with
one 'error:' line, the right exit code, no output and every input byte-for-byte unchanged.
Real files from registry packages (pydicom, pydicom-data) check the readers users rely on:
JPEG Lossless series and Enhanced (multi-frame) CT.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import pytest  # noqa: E402

import evaluate  # noqa: E402
import GUI  # noqa: E402
import protect  # noqa: E402
import tamper  # noqa: E402
import train  # noqa: E402
from conftest import ROOT, make_phantom  # noqa: E402
from helpers import SHAPE, Ctx, assert_refused, call, phantom_scan, tree  # noqa: E402
from scanDataset import SCAN_SUFFIXES  # noqa: E402
from entry_points import (FILE_ENTRIES, FOLDER_ENTRIES, _ctx, _edit_dicom, _edit_header,  # noqa: E402
                          _entry_param, _mhd, _series)
from utils.errors import OutputError, ScanFormatError  # noqa: E402
from utils.scan_io import Scan, load_scan, refuse_overwrite, save_dicom_series, save_mhd, validate_dicom  # noqa: E402


# ==============================================================================================
# the corpus: builders write one hostile input into `d` and return its path
# ==============================================================================================
def _data_file(name):
    def build(d):
        secret = d.parent / "secret.raw"
        secret.write_bytes(np.arange(np.prod(SHAPE), dtype=np.int16).tobytes())
        p = _mhd(d, "names_" + name.strip("./").replace("/", "_") + ".mhd")
        return _edit_header(p, "ElementDataFile", name)
    return build


def mhd_data_link_out(d):
    outside = d.parent / "elsewhere"
    outside.mkdir()
    p = _mhd(outside, "real.mhd")
    q = d / "link.mhd"
    shutil.copy(p, q)
    (d / "link.raw").symlink_to(p.with_suffix(".raw"))
    return _edit_header(q, "ElementDataFile", "link.raw")


def _nrrd_text(sizes: str, typ: str = "short", extra: str = "") -> str:
    return (f"NRRD0004\ntype: {typ}\ndimension: 3\nsizes: {sizes}\nspacings: 0.7 0.7 2.5\n"
            f"encoding: raw\nendian: little\n{extra}")


def nhdr_data_outside(d):
    p = d / "outside.nhdr"
    p.write_text(_nrrd_text("8 8 4", extra="data file: /etc/passwd\n"))
    return p


def nhdr_data_list(d):
    p = d / "list.nhdr"
    p.write_text(_nrrd_text("8 8 4", extra="data file: LIST\nslice0.raw\n"))
    return p


def nrrd_bomb(d):  # 4 KB that claims 1500 x 1500 x 1000 shorts (4.5 GB)
    p = d / "bomb.nrrd"
    p.write_bytes(_nrrd_text("1500 1500 1000").encode() + b"\n" + b"\0" * 4000)
    return p


def nrrd_gzip_short(d):
    import gzip

    p = d / "short_gz.nrrd"
    body = gzip.compress(b"\0" * 1000)
    p.write_bytes(_nrrd_text("64 64 40").replace("encoding: raw", "encoding: gzip").encode() + b"\n" + body)
    return p


def mhd_bomb(d):
    return _edit_header(_mhd(d, "bomb.mhd"), "DimSize", "100000 100000 100000")


def nifti_bomb(d):
    import SimpleITK as sitk

    p = d / "bomb.nii"
    sitk.WriteImage(sitk.GetImageFromArray(make_phantom(SHAPE)), str(p))
    raw = bytearray(p.read_bytes())
    raw[40:56] = np.array([3, 30000, 30000, 30000, 1, 1, 1, 1], dtype="<i2").tobytes()
    p.write_bytes(bytes(raw))
    return p


def npy_bomb(d):  # a header declaring (1e5)^3 voxels over a few bytes of data
    p = d / "bomb.npy"
    with open(p, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i2", "fortran_order": False,
                                                 "shape": (100000, 100000, 100000)})
        f.write(b"\0" * 64)
    return p


def npy_strings(d):
    p = d / "strings.npy"
    np.save(p, np.full((3, 4, 4), "abc"))
    return p


def npy_structured(d):
    p = d / "structured.npy"
    np.save(p, np.zeros((3, 4, 4), dtype=[("a", "<i2"), ("b", "<f4")]))
    return p


def _npy_sidecar(geo):
    def build(d):
        p = d / "side.npy"
        np.save(p, make_phantom(SHAPE))
        p.with_suffix(".json").write_text(geo if isinstance(geo, str) else json.dumps(geo))
        return p
    return build


def mhd_nan_spacing(d):
    return _edit_header(_mhd(d, "nan_spacing.mhd"), "ElementSpacing", "nan 0.7 2.5")


def mhd_ushort_for_short(d):  # same voxel size, wrong type: air (-1000) reads as 64536
    return _edit_header(_mhd(d, "ushort.mhd"), "ElementType", "MET_USHORT")


def mhd_not_orthonormal(d):
    return _edit_header(_mhd(d, "sheared.mhd"), "TransformMatrix", "1 0 0 0.5 1 0 0 0 1")


def _dicom_broken(which: int, content: Callable[[Path], bytes], tag: str):
    def build(d):
        p, files = _series(d, f"series_{tag}")
        f = files[which]
        f.write_bytes(content(f))
        return p
    return build


def _no_dicm(f: Path) -> bytes:  # the file without its 128-byte preamble and DICM marker
    return f.read_bytes()[132:]


def dicom_stray_file(d):
    p, _ = _series(d, "series_stray")
    (p / "notes.txt").write_text("scanner notes\n")
    return p


def _dicom_edit(tag: str, first_only: bool = False, **changes):
    def build(d):
        p, files = _series(d, f"series_{tag}")
        for f in files[:1] if first_only else files:
            _edit_dicom(f, **changes)
        return p
    return build


def _dicom_raw_value(tag: str, keyword: str, value: bytes):
    """Write a raw (possibly invalid) value into every slice: pydicom would refuse to set it."""
    def build(d):
        from pydicom.dataelem import RawDataElement
        from pydicom.datadict import dictionary_VR, tag_for_keyword

        p, files = _series(d, f"series_{tag}")
        t = tag_for_keyword(keyword)
        for f in files:
            ds = pydicom.dcmread(f)
            ds[t] = RawDataElement(pydicom.tag.Tag(t), dictionary_VR(t), len(value), value, 0, False, True)
            ds.save_as(f, enforce_file_format=True)
        return p
    return build


def _npy_values(name: str, values: np.ndarray):
    def build(d):
        p = d / f"{name}.npy"
        np.save(p, values)
        return p
    return build


_MASK = make_phantom(SHAPE) > -500  # a lung-style mask: true/false, not HU


def _mhd_edited(name: str, key: str, value: str):
    return lambda d: _edit_header(_mhd(d, name), key, value)


def symlink_loop(d):
    p = d / "loop.mhd"
    p.symlink_to(d / "loop2.mhd")
    (d / "loop2.mhd").symlink_to(p)
    return p


# name -> (builder, exit code)
HOSTILE: dict[str, tuple[Callable, int]] = {
    "mhd_data_absolute": (_data_file("/etc/passwd"), 4),
    "mhd_data_parent": (_data_file("../secret.raw"), 4),
    "mhd_data_subfolder": (_data_file("sub/data.raw"), 4),
    "mhd_data_list": (_data_file("LIST"), 4),
    "mhd_data_link_out": (mhd_data_link_out, 4),
    "nhdr_data_outside": (nhdr_data_outside, 4),
    "nhdr_data_list": (nhdr_data_list, 4),
    "nrrd_bomb": (nrrd_bomb, 4),
    "nrrd_gzip_short": (nrrd_gzip_short, 4),
    "mhd_bomb": (mhd_bomb, 4),
    "nifti_bomb": (nifti_bomb, 4),
    "npy_bomb": (npy_bomb, 4),
    "npy_strings": (npy_strings, 4),
    "npy_structured": (npy_structured, 4),
    "sidecar_list": (_npy_sidecar([1, 2, 3]), 4),
    "sidecar_spacing_text": (_npy_sidecar({"spacing_zyx": "abc"}), 4),
    "sidecar_spacing_two": (_npy_sidecar({"spacing_zyx": [2.5, 0.7]}), 4),
    "sidecar_nested": (_npy_sidecar({"spacing_zyx": {"z": 1}, "origin_zyx": [[0], [0], [0]]}), 4),
    "sidecar_zero_spacing": (_npy_sidecar({"spacing_zyx": [0, 0.7, 0.7]}), 4),
    "sidecar_nan_spacing": (_npy_sidecar('{"spacing_zyx": [NaN, 0.7, 0.7]}'), 4),
    "sidecar_singular": (_npy_sidecar({"direction_zyx": [[1, 0, 0], [1, 0, 0], [0, 0, 1]]}), 4),
    "sidecar_wrong_shape": (_npy_sidecar({"shape_zyx": [1, 2, 3]}), 4),
    "mhd_nan_spacing": (mhd_nan_spacing, 4),
    "mhd_ushort_for_short": (mhd_ushort_for_short, 4),
    "mhd_not_orthonormal": (mhd_not_orthonormal, 4),
    "dicom_first_empty": (_dicom_broken(0, lambda f: b"", "first_empty"), 4),
    "dicom_last_short": (_dicom_broken(-1, lambda f: f.read_bytes()[:200], "last_short"), 4),
    "dicom_first_text": (_dicom_broken(0, lambda f: b"not a slice\n", "first_text"), 4),
    "dicom_last_no_dicm": (_dicom_broken(-1, _no_dicm, "last_no_dicm"), 4),
    "dicom_stray_file": (dicom_stray_file, 4),
    "dicom_slope_nan": (_dicom_raw_value("slope_nan", "RescaleSlope", b"NaN "), 4),
    "dicom_slope_inf": (_dicom_raw_value("slope_inf", "RescaleSlope", b"inf "), 4),
    "dicom_slope_text": (_dicom_raw_value("slope_abc", "RescaleSlope", b"abc "), 4),
    "dicom_intercept_huge": (_dicom_raw_value("icpt_huge", "RescaleIntercept", b"1e30"), 4),
    "dicom_frames_text": (_dicom_raw_value("frames_x", "NumberOfFrames", b"x "), 4),
    "dicom_spacing_zero": (_dicom_edit("psp_zero", PixelSpacing=[0, 0]), 4),
    "dicom_spacing_negative": (_dicom_edit("psp_neg", PixelSpacing=[-0.7, -0.7]), 4),
    "dicom_orientation_not_unit": (_dicom_edit("iop", ImageOrientationPatient=[2, 0, 0, 0, 0.5, 0]), 4),
    "dicom_huge_rows": (_dicom_edit("rows", Rows=60000, Columns=60000), 4),
    "symlink_loop": (symlink_loop, 3),
    # geometry a CT cannot have (docs/safety.md#geometry-and-content), content that is not HU
    "mhd_spacing_huge": (_mhd_edited("huge.mhd", "ElementSpacing", "1e300 0.7 2.5"), 4),
    "mhd_spacing_tiny": (_mhd_edited("tiny.mhd", "ElementSpacing", "0.7 0.7 1e-9"), 4),
    "mhd_origin_nan": (_mhd_edited("origin.mhd", "Offset", "nan 0 inf"), 4),
    "mhd_direction_nan": (_mhd_edited("dirnan.mhd", "TransformMatrix", "nan 0 0 0 1 0 0 0 1"), 4),
    "sidecar_spacing_huge": (_npy_sidecar({"spacing_zyx": [1e300, 0.7, 0.7]}), 4),
    "dicom_spacing_huge": (_dicom_edit("psp_huge", PixelSpacing=[1e6, 1e6]), 4),
    "npy_bool": (_npy_values("mask_bool", _MASK), 4),
    "npy_mask_01": (_npy_values("mask_01", _MASK.astype(np.uint8)), 4),
    "npy_normalised": (_npy_values("unit", (make_phantom(SHAPE) + 1024.0) / 4096.0), 4),
}


def _folder_code(bad: Path, code: int) -> int:
    """A data folder lists only scan suffixes and DICOM folders; other files leave it empty."""
    listed = bad.is_dir() or (bad.name.lower().endswith(SCAN_SUFFIXES) and not bad.is_symlink())
    return code if listed else 3


def _run_hostile(entry, case, request, tmp_path, capfd, folder: bool):
    main, argv = (FOLDER_ENTRIES if folder else FILE_ENTRIES)[entry]
    c = _ctx(request, tmp_path, entry)
    inputs = tmp_path / "in"
    inputs.mkdir()
    builder, code = HOSTILE[case]
    bad = builder(inputs)
    out = tmp_path / "out"
    before = tree(tmp_path)
    res = call(main, argv(inputs if folder else bad, out, c), capfd)
    code = _folder_code(bad, code) if folder else code
    assert_refused(res, code, (bad.stem, inputs.name) if folder else (bad.stem,), tmp_path, before, entry)


_CHEAP = ("tamper", "GUI", "verify")  # they read the scan before loading any model


@pytest.mark.parametrize("entry,case", [pytest.param(e, c, id=f"{e}-{c}") for e in _CHEAP for c in HOSTILE])
def test_hostile_scan(entry, case, request, tmp_path, capfd):
    _run_hostile(entry, case, request, tmp_path, capfd, folder=False)


@pytest.mark.slow
@pytest.mark.parametrize("entry,case", [_entry_param("protect", c) for c in HOSTILE])
def test_hostile_scan_protect(entry, case, request, tmp_path, capfd):
    _run_hostile(entry, case, request, tmp_path, capfd, folder=False)


@pytest.mark.slow
@pytest.mark.parametrize("entry,case", [_entry_param(e, c) for e in FOLDER_ENTRIES for c in HOSTILE])
def test_hostile_scan_in_a_data_folder(entry, case, request, tmp_path, capfd):
    _run_hostile(entry, case, request, tmp_path, capfd, folder=True)


def test_nothing_of_a_named_file_reaches_an_output(tmp_path, capfd, empty_models):
    """tamper -f numpy on a header naming /etc/passwd: refused, no output at all."""
    d = tmp_path / "in"
    d.mkdir()
    bad = _data_file("/etc/passwd")(d)
    before = tree(tmp_path)
    res = call(tamper.main, ["-t", bad, "-d", tmp_path / "out", "-a", "inject", "-c", "6,20,20",
                             "-f", "numpy", "--models", empty_models], capfd)
    assert_refused(res, 4, ("not beside it",), tmp_path, before)


def test_bomb_refused_before_any_allocation(tmp_path):
    """The 4 KB NRRD claiming 4.5 GB fails in a fresh process that grows by less than 50 MB."""
    bad = nrrd_bomb(tmp_path)
    code = ("import resource, sys\nfrom utils.scan_io import load_scan\nfrom utils.errors import MitsError\n"
            "import SimpleITK, pydicom\nrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"before = rss()\ntry:\n    load_scan({str(bad)!r})\nexcept MitsError as e:\n    print('refused', e)\n"
            "print(rss() - before)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines[0].startswith("refused"), r.stdout + r.stderr
    assert int(lines[-1]) < 50_000, f"peak RSS grew by {lines[-1]} kB"


def test_memory_check_every_format(tmp_path, monkeypatch):
    """With little memory available, a well-formed scan of every format is refused up front."""
    import utils.scan as S

    monkeypatch.setattr(S, "available_memory", lambda: 10_000)
    scan = phantom_scan()
    paths = [save_mhd(scan, tmp_path / "a.mhd"), save_dicom_series(scan, tmp_path / "series")]
    np.save(tmp_path / "b.npy", scan.hu)
    import SimpleITK as sitk

    for name in ("c.nrrd", "d.nii"):
        sitk.WriteImage(sitk.GetImageFromArray(scan.hu), str(tmp_path / name))
    paths += [tmp_path / "b.npy", tmp_path / "c.nrrd", tmp_path / "d.nii"]
    for p in paths:
        with pytest.raises(ScanFormatError, match="of memory is available"):
            load_scan(p)


# ==============================================================================================
# nothing lost: outputs named like any file the input reads
# ==============================================================================================
def _renamed_data(d: Path, data_name: str) -> Path:
    """in/scan.mhd whose header names `data_name` (the .raw renamed to match)."""
    p = _mhd(d, "scan.mhd")
    p.with_suffix(".raw").rename(d / data_name)
    return _edit_header(p, "ElementDataFile", data_name)


@pytest.mark.parametrize("target,data_name", [("data.mhd", "data.raw"), ("DATA.mhd", "data.raw"),
                                              (".", "scan_protected.raw")])
def test_protect_refuses_the_data_file_the_header_names(target, data_name, ckpt, tmp_path, capfd):
    d = tmp_path / "in"
    d.mkdir()
    scan = _renamed_data(d, data_name)
    out = d if target == "." else d / target
    before = tree(tmp_path)
    res = call(protect.main, [scan, "-c", ckpt, "-o", out, "--no-progress"], capfd)
    assert_refused(res, OutputError.exit_code, ("refusing to overwrite",), tmp_path, before)


def test_tamper_refuses_the_data_file_and_the_input_folder(empty_models, tmp_path, capfd):
    d = tmp_path / "in"
    d.mkdir()
    scan = _renamed_data(d, "scan_tampered.raw")
    series, _ = _series(tmp_path, "series")
    for target in (scan, series):
        before = tree(tmp_path)
        res = call(tamper.main, ["-t", target, "-d", target.parent if target == scan else target, "-a", "inject",
                                 "-c", "6,20,20", "--models", empty_models], capfd)
        assert_refused(res, OutputError.exit_code, ("refusing to overwrite",), tmp_path, before)


def test_links_and_case_are_the_same_file(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    scan = _mhd(d, "scan.mhd")
    raw = scan.with_suffix(".raw")
    (tmp_path / "hard.raw").hardlink_to(raw)
    (tmp_path / "soft.raw").symlink_to(raw)
    (tmp_path / "soft_dir").symlink_to(d)
    for target in (tmp_path / "hard.mhd", tmp_path / "soft.mhd", tmp_path / "soft_dir" / "scan.mhd",
                   d / "SCAN.mhd"):
        with pytest.raises(OutputError, match="refusing to overwrite"):
            refuse_overwrite(target, scan)
    refuse_overwrite(tmp_path / "other.mhd", scan)  # a plain new name is fine
    series, _ = _series(tmp_path, "series")
    (tmp_path / "series_link").symlink_to(series)  # an output folder inside the input series
    with pytest.raises(OutputError, match="inside the input DICOM folder"):
        refuse_overwrite(tmp_path / "series_link" / "out", series)
    with pytest.raises(OutputError, match="input .* is inside it"):
        refuse_overwrite(tmp_path, series)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(OutputError, match="loop"):
        refuse_overwrite(loop, scan)


def test_writers_refuse_the_named_data_file(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    scan_path = _renamed_data(d, "data.raw")
    digest = tree(tmp_path)
    scan = load_scan(scan_path)
    with pytest.raises(OutputError, match="refusing to overwrite"):
        save_mhd(scan, d / "data.mhd")
    assert tree(tmp_path) == digest


@pytest.mark.parametrize("flag", [["-o", "LOOP"], ["--device", "foo"]])
def test_protect_bad_output_link_and_device(flag, ckpt, tmp_path, capfd):
    scan = _mhd(tmp_path, "chest.mhd")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    argv = [scan, "-c", ckpt, "--no-progress", *[loop if a == "LOOP" else a for a in flag]]
    before = tree(tmp_path)
    res = call(protect.main, argv, capfd)
    assert_refused(res, 7 if flag[0] == "-o" else 2, ("loop", "foo"), tmp_path, before)


def test_tamper_models_symlink_loop(tmp_path, capfd):
    scan = _mhd(tmp_path, "chest.mhd", shape=(14, 48, 48))  # CT-GAN's 32 mm cube fits
    loop = tmp_path / "models"
    loop.symlink_to(loop)
    before = tree(tmp_path)
    res = call(tamper.main, ["-t", scan, "-d", tmp_path / "out", "-a", "inject", "-c", "6,20,20",
                             "--models", loop], capfd)
    assert_refused(res, 6, ("models",), tmp_path, before)


# ==============================================================================================
# one line for bad options
# ==============================================================================================
@pytest.mark.parametrize("argv", [["--device", "foo"], ["--lr_g", "nan"], ["--max_steps", "-5"],
                                  ["--lr_d", "inf"], ["--log_every", "0"]])
def test_train_bad_options(argv, empty_models, tmp_path, capfd):
    data = tmp_path / "data"
    data.mkdir()
    _mhd(data, "a.mhd")
    before = tree(tmp_path)
    res = call(train.main, ["--preset", "demo", "--data_dir", data, "--models_dir", empty_models,
                            "--out_dir", tmp_path / "run", "--progress", "false", *argv], capfd)
    assert_refused(res, 2, (argv[0].lstrip("-"), argv[1]), tmp_path, before)


def test_device_parser_everywhere(tmp_path, capfd):
    from procedures.baselines import tafim as tafim
    from utils.device import pick_device
    from utils.errors import UsageError

    for bad in ("foo", "cuda:x", "cpu:0:1", ""):
        with pytest.raises(UsageError, match="not a device"):
            pick_device(bad)
    assert pick_device("cpu").type == "cpu"
    before = tree(tmp_path)
    res = call(evaluate.main, ["--methods", "noise", "--data", tmp_path, "--out", tmp_path / "o",
                               "--device", "foo"], capfd)
    assert_refused(res, 2, ("foo",), tmp_path, before)
    res = call(tafim.main, ["--data", tmp_path, "--out", tmp_path / "o", "--device", "foo"], capfd)
    assert_refused(res, 2, ("foo",), tmp_path, before)


def test_failed_run_leaves_no_figure(tmp_path):
    from utils.atomic import removed_on_failure

    (tmp_path / "qualitative_old.png").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with removed_on_failure(tmp_path, "qualitative_*.png"):
            (tmp_path / "qualitative_new.png").write_bytes(b"new")
            raise RuntimeError("the evaluation failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qualitative_old.png"]
    with removed_on_failure(tmp_path, "qualitative_*.png"):
        (tmp_path / "qualitative_ok.png").write_bytes(b"ok")
    assert (tmp_path / "qualitative_ok.png").exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to switch user")
@pytest.mark.parametrize("entry", ["tamper", "train"])
def test_unreadable_folder_as_another_user(entry):
    """Mode 000 stops everyone but root: run the entry point as 'nobody' on a locked series
    (tamper: the scan; train: a sub-folder of its data folder)."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="unreadable-"))
    try:
        base.chmod(0o777)
        series, _ = _series(base, "series")
        series.chmod(0)
        argv = (["-t", str(series), "-d", str(base / "out"), "-a", "inject", "-c", "1,1,1"] if entry == "tamper" else
                ["--preset", "demo", "--data_dir", str(base), "--out_dir", str(base / "run"), "--progress", "false"])
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\nfrom utils.errors import run_cli\n"
                f"import {entry}\nsys.exit(run_cli({entry}.main, {argv!r}))\n")
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                           capture_output=True, text=True, timeout=300)
        if "error:" not in r.stderr and "Permission denied" in r.stderr:
            pytest.skip("the interpreter or the repository is not readable by 'nobody' here")
        assert r.returncode == 3, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {series}: cannot read"), r.stderr
        assert sorted(p.name for p in base.iterdir()) == ["series"]
    finally:
        series.chmod(0o755)
        shutil.rmtree(base)


# ==============================================================================================
# DICOM written is valid and faithful; real files users expect to read
# ==============================================================================================
def _real_series(name: str, d: Path, n: int = 3, **changes) -> Path:
    """A CT series of `n` slices made from one real registry file (its pixel data untouched)."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import CTImageStorage, generate_uid

    src = get_testdata_file(name)
    if src is None:
        pytest.skip(f"{name} not installed (pip install pydicom-data)")
    d.mkdir()
    series = generate_uid()
    for k in range(n):
        ds = pydicom.dcmread(src)
        ds.Modality, ds.SOPClassUID, ds.SeriesInstanceUID = "CT", CTImageStorage, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 5.0 * k]
        ds.PixelSpacing = ds.get("PixelSpacing", [0.7, 0.7])
        for kw, v in changes.items():
            setattr(ds, kw, v)
        ds.save_as(d / f"IM{k:03d}.dcm", enforce_file_format=True)
    return d


def test_jpeg_lossless_series_real_file(tmp_path):
    """pydicom-data's JPEG-LL.dcm (process 14, SV1) as a 3-slice series: decoded exactly."""
    from pydicom.data import get_testdata_file

    series = _real_series("JPEG-LL.dcm", tmp_path / "jll")
    ref = pydicom.dcmread(get_testdata_file("JPEG-LL.dcm"))
    assert ref.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    scan = load_scan(series)
    expected = ref.pixel_array.astype(np.int64) * int(ref.get("RescaleSlope", 1)) + int(ref.get("RescaleIntercept", 0))
    assert scan.hu.shape == (3, *ref.pixel_array.shape)
    # The range pylibjpeg decodes too (a second decoder, checked when this test was written).
    assert (int(scan.hu.min()), int(scan.hu.max())) == (0, 278)
    for k in range(3):
        np.testing.assert_array_equal(scan.hu[k], expected)
    out = save_dicom_series(scan, tmp_path / "out")
    errors = validate_dicom(out)
    assert errors in (None, []), errors


def test_enhanced_ct_real_file(tmp_path):
    """pydicom-data's eCT_Supplemental.dcm: one file, two frames 10 mm apart, geometry and
    rescale in the functional groups."""
    from pydicom.data import get_testdata_file

    src = get_testdata_file("eCT_Supplemental.dcm")
    if src is None:
        pytest.skip("eCT_Supplemental.dcm not installed (pip install pydicom-data)")
    ds = pydicom.dcmread(src)
    folder = tmp_path / "enhanced"
    folder.mkdir()
    shutil.copy(src, folder / "eCT.dcm")
    for path in (folder, folder / "eCT.dcm"):
        scan = load_scan(path)
        assert scan.hu.shape == (2, 512, 512)
        np.testing.assert_allclose(scan.spacing, [10.0, 0.388672, 0.388672])
        # In-stack position 1 is at z = -149, position 2 at -159; IOP row = -x: slices ascend
        # along row x column = -z, so -149 comes first.
        np.testing.assert_allclose(scan.origin, [-149.0, -301.5, 99.5])
        px = ds.pixel_array.astype(np.int64) - 1024  # shared Pixel Value Transformation
        np.testing.assert_array_equal(scan.hu[0], px[1])
        np.testing.assert_array_equal(scan.hu[1], px[0])
    out = save_dicom_series(scan, tmp_path / "out")
    assert validate_dicom(out) in (None, [])
    assert pydicom.dcmread(sorted(out.iterdir())[0]).SliceThickness == 10


@pytest.mark.parametrize("name", ["J2K_pixelrep_mismatch.dcm", "CT_small.dcm"])
def test_written_dicom_keeps_thickness_and_passes_dciodvfy(name, tmp_path):
    """Real sources (HEAD body part; no body part): no empty Laterality where it is an error,
    and SliceThickness stays the source's, not the slice spacing."""
    series = _real_series(name, tmp_path / "src", SliceThickness="1.25")
    scan = load_scan(series)
    assert scan.spacing[0] == 5.0
    out = save_dicom_series(scan, tmp_path / "out")
    first = pydicom.dcmread(sorted(out.iterdir())[0])
    assert float(first.SliceThickness) == 1.25
    errors = validate_dicom(out)
    if errors is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    assert errors == []


@pytest.mark.tf
def test_failed_evaluation_leaves_no_figure(held_ctgan_models, tmp_path, capfd, monkeypatch):
    """evaluate.py writes a figure per scan; when a later step fails, none of them is left."""
    import procedures.evaluation.reports as E
    from utils.errors import MitsError

    def fail(res, out, **kw):
        assert list(Path(out).glob("qualitative_*.png")), "the figure should exist before the failure"
        raise MitsError("reports failed")

    monkeypatch.setattr(E, "write_reports", fail)
    data = tmp_path / "data"
    data.mkdir()
    save_mhd(Scan(make_phantom((30, 48, 48), seed=0), (2.5, 0.7, 0.7), (0.0, 0.0, 0.0)), data / "a.mhd")
    out = tmp_path / "out"
    res = call(evaluate.main, ["--methods", "noise", "--noise-rms", "5", "--actions", "inject", "--data", data,
                               "--models", held_ctgan_models, "--out", out, "--no-progress", "--device", "cpu",
                               "--n-locations", "1"], capfd)
    assert res.rc == 2 and res.err.strip() == "error: reports failed", res.err
    assert not list(out.glob("qualitative_*.png"))


def test_enhanced_ct_broken_or_mixed(tmp_path):
    """An Enhanced CT frame without its plane position, or a multi-frame file beside single
    slices, is one line naming the file; a DICOMDIR beside a series is ignored."""
    from pydicom.data import get_testdata_file

    src = get_testdata_file("eCT_Supplemental.dcm")
    if src is None:
        pytest.skip("eCT_Supplemental.dcm not installed (pip install pydicom-data)")
    broken = tmp_path / "broken"
    broken.mkdir()
    ds = pydicom.dcmread(src)
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    ds.save_as(broken / "eCT.dcm")
    with pytest.raises(ScanFormatError, match="frame 2 has no plane position"):
        load_scan(broken)
    series, _ = _series(tmp_path, "series")
    shutil.copy(src, series / "eCT.dcm")
    _edit_dicom(series / "eCT.dcm", SeriesInstanceUID=pydicom.dcmread(sorted(series.iterdir())[0]).SeriesInstanceUID)
    with pytest.raises(ScanFormatError, match="eCT.dcm: slice size|several frames"):
        load_scan(series)
    (series / "eCT.dcm").unlink()
    dicomdir = get_testdata_file("DICOMDIR")
    if dicomdir is not None:
        shutil.copy(dicomdir, series / "DICOMDIR")
        assert load_scan(series).hu.shape == SHAPE


# ==============================================================================================
# each operation's minimum size, one-slice volumes, resumed runs, quoted header values
# ==============================================================================================
def _scan_file(d: Path, shape, spacing=(2.5, 0.7, 0.7), hu=None, name="small.mhd") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    vol = make_phantom(shape) if hu is None else hu
    save_mhd(Scan(vol, spacing, (0.0, 0.0, 0.0)), d / name)
    return d / name


# (entry, shape, argv after the scan's own, what the line names); the refusals of
# docs/safety.md#what-a-scan-may-be: the generator's slabs and slice size, CT-GAN's 32 mm cube.
_TOO_SMALL = {
    "protect-4x1x1": ("protect", (4, 1, 1), "generator"),
    "protect-4x8x8": ("protect", (4, 8, 8), "generator"),
    "protect-2-slices": ("protect", (2, 48, 48), "generator"),
    "protect-targets-2-slices": ("protect-targets", (2, 48, 48), "CT-GAN's tamper"),
    "tamper-2-slices": ("tamper", (2, 48, 48), "CT-GAN's tamper"),
    "tamper-1x1-pixels": ("tamper", (20, 1, 1), "CT-GAN's tamper"),
    "GUI-2-slices": ("GUI", (2, 48, 48), "CT-GAN's tamper"),
    "train-2-slices": ("train", (2, 48, 48), "training"),
}


@pytest.mark.parametrize("case", list(_TOO_SMALL))
def test_too_small_for_the_operation(case, ckpt, empty_models, tmp_path, capfd):
    """4 x 1 x 1, 4 x 8 x 8 or 2 slices: the operation that cannot work on it refuses it in one
    line that names the operation and its minimum; nothing is written."""
    entry, shape, names = _TOO_SMALL[case]
    scan = _scan_file(tmp_path / "in", shape)
    out = tmp_path / "out"
    if entry == "train":
        _scan_file(tmp_path / "in", (24, 48, 48), name="big.mhd")
        c = Ctx(tmp_path, empty_models=empty_models)
        main, argv = train.main, FOLDER_ENTRIES["train"][1](scan.parent, out, c)
    elif entry.startswith("protect"):
        targets = tmp_path / "t.csv"
        targets.write_text("z,y,x\n1,0,0\n")
        main = protect.main
        argv = [scan, "-o", out, "--no-progress", "--models", empty_models] + (
            ["--targets", targets] if entry == "protect-targets" else ["-c", ckpt])
    elif entry == "tamper":
        main = tamper.main
        argv = ["-t", scan, "-d", out, "-a", "inject", "-c", "1,0,0", "--models", empty_models]
    else:
        main, argv = GUI.main, ["--scan", scan, "--models", empty_models, "--out", out]
    before = tree(tmp_path)
    res = call(main, argv, capfd)
    assert_refused(res, ScanFormatError.exit_code, ("too small",), tmp_path, before)
    assert names in res.err and "small.mhd" in res.err, res.err


def test_constant_volume_is_refused_by_the_generator(ckpt, tmp_path, capfd):
    """One value everywhere: the generator keeps values in the scan's range, so '0% changed'
    would be a lie; refused instead."""
    scan = _scan_file(tmp_path / "in", (8, 48, 48), hu=np.full((8, 48, 48), -1000, np.int16))
    before = tree(tmp_path)
    res = call(protect.main, [scan, "-c", ckpt, "-o", tmp_path / "out", "--no-progress"], capfd)
    assert_refused(res, ScanFormatError.exit_code, ("every voxel is -1000 HU",), tmp_path, before)


@pytest.mark.parametrize("fmt", ["mhd", "npy", "dicom"])
def test_one_slice_is_a_volume_for_the_readers(fmt, ckpt, tmp_path, capfd):
    """A series of one slice reads as a (1, y, x) volume with its geometry in every format; the
    signs baseline changes each of its voxels; the generator refuses it by its slab size."""
    from procedures.protection.targeted import TargetSettings, background
    from utils.scan_io import save_numpy

    scan = phantom_scan(shape=(1, 48, 48))
    p = tmp_path / "in" / ("one" if fmt == "dicom" else f"one.{fmt}")
    p.parent.mkdir()
    {"mhd": save_mhd, "npy": save_numpy, "dicom": save_dicom_series}[fmt](scan, p)
    back = load_scan(p)
    assert back.shape == (1, 48, 48)
    np.testing.assert_array_equal(back.hu, scan.hu)
    np.testing.assert_allclose(back.spacing, scan.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.origin, scan.origin, atol=1e-6)
    signs = background(back.hu, TargetSettings(eps=3.0), p.name)
    np.testing.assert_array_equal(np.abs(signs - back.hu), 3.0)
    before = tree(tmp_path)
    res = call(protect.main, [p, "-c", ckpt, "-o", tmp_path / "out", "--no-progress"], capfd)
    assert_refused(res, ScanFormatError.exit_code, ("slabs of 4",), tmp_path, before)


def test_one_slice_dicom_without_thickness_is_refused(tmp_path):
    p, files = _series(tmp_path, "one", shape=(1, 8, 8))
    _edit_dicom(files[0], SliceThickness=None)
    with pytest.raises(ScanFormatError, match="one slice without SliceThickness"):
        load_scan(p)


def test_two_frame_enhanced_ct_reads_and_the_generator_says_why(ckpt, tmp_path, capfd):
    from pydicom.data import get_testdata_file

    src = get_testdata_file("eCT_Supplemental.dcm")
    if src is None:
        pytest.skip("eCT_Supplemental.dcm not installed (pip install pydicom-data)")
    folder = tmp_path / "in" / "enhanced"
    folder.mkdir(parents=True)
    shutil.copy(src, folder / "eCT.dcm")
    assert load_scan(folder).shape == (2, 512, 512)
    before = tree(tmp_path)
    res = call(protect.main, [folder, "-c", ckpt, "-o", tmp_path / "out", "--no-progress"], capfd)
    assert_refused(res, ScanFormatError.exit_code, ("slabs of 4",), tmp_path, before)


def test_resume_refuses_a_changed_network_flag(ckpt, tmp_path, capfd):
    """--g_width 8 on a width-4 checkpoint: one line naming the flag and both values."""
    before = tree(tmp_path)
    res = call(train.main, ["--resume", ckpt, "--out_dir", tmp_path / "run", "--g_width", "8",
                            "--progress", "false"], capfd)
    assert_refused(res, 6, ("--g_width 8 differs from the checkpoint's 4",), tmp_path, before)


# Every attribute a DICOM reader parses and could quote, set to a patient-like string.
_PLANTED = "SECRETNAME"
_QUOTED = ["PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "RescaleSlope",
           "RescaleIntercept", "NumberOfFrames", "Modality", "SliceThickness",
           "SpacingBetweenSlices", "SeriesDescription"]


def _planted_series(d: Path, keyword: str) -> Path:
    """A series whose `keyword` holds the planted text (raw bytes: pydicom would refuse it).
    SliceThickness and SpacingBetweenSlices are read for a series of one slice only; a series
    description is quoted only when two series share the folder."""
    from pydicom.dataelem import RawDataElement
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    one = keyword in ("SliceThickness", "SpacingBetweenSlices")
    p, files = _series(d, "series", shape=(1, 8, 8) if one else SHAPE)
    if keyword == "SeriesDescription":
        _series(d, "other", seed=1, desc=_PLANTED)
        for f in (d / "other").iterdir():
            shutil.move(f, p / f"b_{f.name}")
        return p
    t = tag_for_keyword(keyword)
    raw = ((_PLANTED + "\\1") if keyword == "PixelSpacing" else _PLANTED).encode()  # even lengths
    for f in files:
        ds = pydicom.dcmread(f)
        ds[t] = RawDataElement(pydicom.tag.Tag(t), dictionary_VR(t), len(raw), raw, 0, False, True)
        if keyword == "SliceThickness" and "SpacingBetweenSlices" in ds:
            del ds.SpacingBetweenSlices
        ds.save_as(f, enforce_file_format=True)
    return p


@pytest.mark.parametrize("keyword", _QUOTED)
@pytest.mark.parametrize("entry", ["protect", "tamper", "GUI", "verify"])
def test_errors_never_quote_dicom_header_values(entry, keyword, request, tmp_path, capfd):
    """Whatever the attribute, an error names it and the file, never its text."""
    c = _ctx(request, tmp_path, entry)
    d = tmp_path / "in"
    d.mkdir()
    series = _planted_series(d, keyword)
    main, argv = FILE_ENTRIES[entry]
    res = call(main, argv(series, tmp_path / "out", c), capfd)
    assert res.exc is None, res.exc
    assert _PLANTED not in res.out + res.err + "".join(res.warned), res.err
    assert res.rc != 0 and res.err.startswith("error: "), res.err


@pytest.mark.parametrize("part", [None, "", "CHEST", "HEAD", "LUNG", "KNEE", "NOT_A_PART"])
@pytest.mark.parametrize("side", [None, "", "L"])
def test_written_dicom_laterality_is_dciodvfy_clean(part, side, tmp_path):
    """Whatever the source says (or not) about the body part and its side, dciodvfy reports
    nothing about Laterality; a side the source states is kept, unless the part is unpaired."""
    from pydicom.dataset import Dataset

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    src = Dataset()
    src.PatientName, src.PatientID = "TEST^SIDE", "S1"
    for kw, v in (("BodyPartExamined", part), ("Laterality", side)):
        if v is not None:
            setattr(src, kw, v)
    out = save_dicom_series(phantom_scan(shape=(2, 8, 8), dicom_headers=[src]), tmp_path / "out")
    first = sorted(out.iterdir())[0]
    res = subprocess.run(["dciodvfy", "-new", str(first)], capture_output=True, text=True,
                         timeout=120)
    said = [ln for ln in (res.stdout + res.stderr).splitlines() if "aterality" in ln]
    assert said == [], said
    written = pydicom.dcmread(first)
    kept = side == "L" and part not in ("CHEST", "HEAD")
    assert written.get("Laterality") == ("L" if kept else None)


def test_one_coordinate_check_for_tamper_and_targets():
    """tamper/GUI (check_coord) and --targets (targets_for_scan) accept and truncate the same
    voxels and refuse the same ones."""
    from procedures.protection.targeted import targets_for_scan
    from utils.errors import CoordinateError
    from utils.scan import check_coord

    scan = phantom_scan()
    for zyx in [(0, 0, 0), (11.9999999, 39.5, 0.2), (5.5, 20.0, 39.99)]:
        rows = [{"filename": None, "zyx": np.array(zyx, float), "world": False}]
        want = tuple(int(v) for v in check_coord(zyx, scan.shape))
        assert targets_for_scan(rows, scan, "a.mhd") == [want]
    for zyx in [(12, 0, 0), (-0.01, 3, 3), (0, 40, 0)]:
        rows = [{"filename": None, "zyx": np.array(zyx, float), "world": False}]
        with pytest.raises(CoordinateError, match="outside the scan"):
            check_coord(zyx, scan.shape)
        with pytest.raises(CoordinateError, match="outside the scan"):
            targets_for_scan(rows, scan, "a.mhd")
        assert targets_for_scan(rows, scan, "a.mhd", strict=False) == []


def test_one_list_of_scan_suffixes(tmp_path):
    """Every scan suffix is read, listed in a data folder and stripped from output names alike:
    'chest.v2.mhd' is tampered as 'chest.v2_tampered.mhd', not 'chest_tampered.mhd'."""
    from scanDataset import list_scans
    from utils.metaimage_io import SITK_SUFFIXES
    from utils.scan_paths import scan_stem

    assert set(SCAN_SUFFIXES) - {".npy"} <= set(SITK_SUFFIXES)
    for suffix in SCAN_SUFFIXES:
        assert scan_stem(f"chest.v2{suffix.upper()}") == "chest.v2"
        (tmp_path / f"s{suffix}").write_bytes(b"x")
    assert sorted(p.name for p in list_scans(tmp_path)) == sorted(f"s{s}" for s in SCAN_SUFFIXES)
    named = tamper.output_path(Path("in/chest.v2.mhd"), Path("o"), "mhd")
    assert named == Path("o/chest.v2_tampered.mhd")
    assert tamper.output_path(Path("in/a.nii.gz"), Path("o"), "numpy") == Path("o/a_tampered.npy")


@pytest.mark.parametrize("origin,ok", [("(-20,5,-7.5)", True), ("(nan,0,inf)", False),
                                       ("(1,abc,2)", False)])
def test_nrrd_geometry_text_is_checked_before_simpleitk(origin, ok, tmp_path):
    """SimpleITK would read 'nan' as 0: the header text is checked first, naming the field."""
    p = tmp_path / "o.nrrd"
    header = ("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 8 8 4\n"
              "space directions: (0.7,0,0) (0,0.7,0) (0,0,2.5)\nencoding: raw\nendian: little\n"
              f"space origin: {origin}\n\n")
    p.write_bytes(header.encode() + np.full(8 * 8 * 4, -1000, "<i2").tobytes())
    if ok:
        np.testing.assert_allclose(load_scan(p).origin, [-7.5, 5, -20])
    else:
        with pytest.raises(ScanFormatError, match="bad space origin"):
            load_scan(p)
