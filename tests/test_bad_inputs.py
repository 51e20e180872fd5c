"""Bad input through every entry point (docs/safety.md#bad-input-one-line-a-distinct-exit-code-no-output).

A corpus of broken scans, checkpoints and paths, generated here, is fed to each entry point's
main(argv) through utils.errors.run_cli. Each run must end with:
  - exactly one line on stderr (file descriptor 2, so C/C++ libraries printing count too),
    starting with "error:" and naming the file;
  - the exit code of the problem's utils.errors class (distinct per kind);
  - no traceback, no warning that a terminal would show;
  - no new file anywhere under the test's folder (no output, no temporary left behind), and
    every input byte-for-byte unchanged.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import evaluate  # noqa: E402
import GUI  # noqa: E402
import protect  # noqa: E402
import tamper  # noqa: E402
import train  # noqa: E402
from conftest import ROOT, make_phantom  # noqa: E402
from helpers import SHAPE, Ctx, assert_refused, call, phantom_scan, tree  # noqa: E402
from helpers import train_argv as _train  # noqa: E402
from procedures.data import prepare as prepare_data  # noqa: E402
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from utils.errors import (CoordinateError, DataFetchError, InputFileError, ModelFileError,  # noqa: E402
                          OutputError, UsageError)
from utils.scan_io import save_mhd  # noqa: E402
from entry_points import (FILE_ENTRIES, FOLDER_ENTRIES, _ctx, _edit_dicom, _edit_header,  # noqa: E402
                          _entry_param, _mhd, _series)



# ==============================================================================================
# the corpus: builders write one bad input into `d` and return its path
# ==============================================================================================
def truncated_raw(d):
    p = _mhd(d, "truncated.mhd")
    raw = p.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:5000])
    return p


def header_lies_size(d):
    return _edit_header(_mhd(d, "lies_size.mhd"), "DimSize", "40 40 30")


def header_lies_type_bigger(d):
    return _edit_header(_mhd(d, "lies_type.mhd"), "ElementType", "MET_DOUBLE")


def header_lies_type_smaller(d):  # 2 bytes a voxel on disk, the header says 1: garbage if read
    return _edit_header(_mhd(d, "lies_type_small.mhd"), "ElementType", "MET_UCHAR")


def compressed_lies_size(d):
    p = d / "lies_zraw.mhd"
    save_mhd(phantom_scan(), p, compress=True)
    return _edit_header(p, "DimSize", "40 40 30")


def missing_raw(d):
    p = _mhd(d, "no_raw.mhd")
    p.with_suffix(".raw").unlink()
    return p


def garbage_header(d):
    p = d / "garbage.mhd"
    p.write_text("this is not a MetaImage header\n")
    return p


def zero_spacing(d):
    return _edit_header(_mhd(d, "zero_spacing.mhd"), "ElementSpacing", "0 0.7 2.5")


def truncated_nifti_gz(d):
    import SimpleITK as sitk

    p = d / "truncated.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(make_phantom(SHAPE)), str(p), useCompression=True)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p


def _float_volume(d, name, bad):
    import SimpleITK as sitk

    a = make_phantom(SHAPE).astype(np.float32)
    a[3, 20, 20] = bad
    p = d / name
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
    return p


def nan_volume(d):
    return _float_volume(d, "nan.mhd", np.nan)


def inf_volume(d):
    return _float_volume(d, "inf.mhd", np.inf)


def image_2d(d):
    import SimpleITK as sitk

    p = d / "flat.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(make_phantom(SHAPE)[5]), str(p))
    return p


def npy_2d(d):
    p = d / "flat.npy"
    np.save(p, make_phantom(SHAPE)[5])
    return p


def empty_file(d):
    p = d / "empty.mhd"
    p.write_bytes(b"")
    return p


def unknown_format(d):
    p = d / "scan.txt"
    p.write_text("z,y,x\n")
    return p


def missing_file(d):
    return d / "nope.mhd"


def through_regular_file(d):  # unreadable path even for root: a parent is a regular file
    (d / "a_file").write_text("x")
    return d / "a_file" / "scan.mhd"


def dangling_symlink(d):
    p = d / "dangling.mhd"
    p.symlink_to(d / "gone" / "scan.mhd")
    return p


def folder_named_like_a_file(d):  # a directory where a file is expected
    p = d / "folder.mhd"
    p.mkdir()
    return p


def empty_folder(d):
    p = d / "empty_series"
    p.mkdir()
    return p


def dicom_missing_slice(d):
    p, files = _series(d, "series_missing")
    files[5].unlink()
    return p


def dicom_mixed_series(d):
    p, _ = _series(d, "series_mixed", desc="first")
    (d / "tmp_other").mkdir()
    q, files = _series(d / "tmp_other", "b", seed=1, desc="second")
    for f in files:
        f.rename(p / f"b_{f.name}")
    q.rmdir()
    (d / "tmp_other").rmdir()
    return p


def dicom_inconsistent_spacing(d):
    p, files = _series(d, "series_spacing")
    ipp = [float(v) for v in pydicom.dcmread(files[6]).ImagePositionPatient]
    _edit_dicom(files[6], ImagePositionPatient=[ipp[0], ipp[1], ipp[2] + 0.9])
    return p


def dicom_not_ct(d):
    p, files = _series(d, "series_mr")
    for f in files:
        _edit_dicom(f, Modality="MR")
    return p


def dicom_compressed_no_decoder(d):
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML  # compressed, and pydicom has no decoder for it

    p, files = _series(d, "series_mpeg")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 30 + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = MPEG2MPML
        ds.save_as(f, enforce_file_format=True)
    return p


def dicom_truncated_pixels(d):
    p, files = _series(d, "series_short_pixels")
    ds = pydicom.dcmread(files[2])
    ds.PixelData = ds.PixelData[:-100]
    ds.save_as(files[2], enforce_file_format=True)
    return p


def dicom_garbage_after_preamble(d):
    p, files = _series(d, "series_garbage")
    files[4].write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))
    return p


def dicom_single_file(d):
    import shutil

    p, files = _series(d, "series_one")
    one = files[0].rename(d / "one_slice.dcm")
    shutil.rmtree(p)
    return one


def dicom_only_subfolders(d):
    p = d / "study"
    p.mkdir()
    _series(p, "inner")
    return p


# name -> (builder, exit code through a file argument, exit code when inside a data folder)
SCANS: dict[str, tuple[Callable, int, int]] = {
    "truncated_raw": (truncated_raw, 4, 4),
    "header_lies_size": (header_lies_size, 4, 4),
    "header_lies_type_bigger": (header_lies_type_bigger, 4, 4),
    "header_lies_type_smaller": (header_lies_type_smaller, 4, 4),
    "compressed_lies_size": (compressed_lies_size, 4, 4),
    "missing_raw": (missing_raw, 3, 3),
    "garbage_header": (garbage_header, 4, 4),
    "zero_spacing": (zero_spacing, 4, 4),
    "truncated_nifti_gz": (truncated_nifti_gz, 4, 4),
    "nan_volume": (nan_volume, 4, 4),
    "inf_volume": (inf_volume, 4, 4),
    "image_2d": (image_2d, 4, 4),
    "npy_2d": (npy_2d, 4, 4),
    "empty_file": (empty_file, 3, 3),
    "unknown_format": (unknown_format, 4, 3),         # a data folder lists no .txt: "no scans"
    "missing_file": (missing_file, 3, 3),
    "through_regular_file": (through_regular_file, 3, 3),
    "dangling_symlink": (dangling_symlink, 3, 3),
    "folder_named_like_a_file": (folder_named_like_a_file, 3, 3),
    "empty_folder": (empty_folder, 3, 3),
    "dicom_missing_slice": (dicom_missing_slice, 4, 4),
    "dicom_mixed_series": (dicom_mixed_series, 4, 4),
    "dicom_inconsistent_spacing": (dicom_inconsistent_spacing, 4, 4),
    "dicom_not_ct": (dicom_not_ct, 4, 4),
    "dicom_compressed_no_decoder": (dicom_compressed_no_decoder, 4, 4),
    "dicom_truncated_pixels": (dicom_truncated_pixels, 4, 4),
    "dicom_garbage_after_preamble": (dicom_garbage_after_preamble, 4, 4),
    "dicom_single_file": (dicom_single_file, 4, 3),   # a lone .dcm in a data folder: "no scans"
    "dicom_only_subfolders": (dicom_only_subfolders, 4, 3),
}
# Path problems of a whole data folder (train --data_dir, evaluate --data).
FOLDER_PATHS = ("missing_file", "through_regular_file", "dangling_symlink", "empty_folder")


# ==============================================================================================
# the table: every bad scan through every entry point that reads scans
# ==============================================================================================
@pytest.mark.parametrize("entry,case", [_entry_param(e, c) for e in FILE_ENTRIES for c in SCANS])
def test_bad_scan_file_entry_points(entry, case, request, tmp_path, capfd):
    main, argv = FILE_ENTRIES[entry]
    c = _ctx(request, tmp_path, entry)
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad = SCANS[case][0](inputs)
    out = tmp_path / "out"
    before = tree(tmp_path)
    res = call(main, argv(bad, out, c), capfd)
    assert_refused(res, SCANS[case][1], (bad.name,), tmp_path, before, entry)


@pytest.mark.parametrize("entry,case", [_entry_param(e, c) for e in FOLDER_ENTRIES for c in SCANS
                                        if c != "missing_file"])
def test_bad_scan_in_a_data_folder(entry, case, request, tmp_path, capfd):
    main, argv = FOLDER_ENTRIES[entry]
    c = _ctx(request, tmp_path, entry)
    data = tmp_path / f"data_{case}"
    data.mkdir()
    bad = SCANS[case][0](data)
    out = tmp_path / "out"
    before = tree(tmp_path)
    res = call(main, argv(data, out, c), capfd)
    assert_refused(res, SCANS[case][2], (bad.name, data.name), tmp_path, before, entry)


@pytest.mark.parametrize("entry,case", [_entry_param(e, c) for e in FOLDER_ENTRIES for c in FOLDER_PATHS])
def test_bad_data_folder_path(entry, case, request, tmp_path, capfd):
    main, argv = FOLDER_ENTRIES[entry]
    c = _ctx(request, tmp_path, entry)
    data = SCANS[case][0](tmp_path)
    out = tmp_path / "out"
    before = tree(tmp_path)
    res = call(main, argv(data, out, c), capfd)
    assert_refused(res, InputFileError.exit_code, (data.name,), tmp_path, before, entry)


# ==============================================================================================
# checkpoints: protect -c, evaluate --checkpoint, GUI --checkpoint, train --resume
# ==============================================================================================
def _ck_missing(d, good):
    return d / "nope.pt"


def _ck_folder(d, good):
    p = d / "folder.pt"
    p.mkdir()
    return p


def _ck_garbage(d, good):
    p = d / "garbage.pt"
    p.write_bytes(os.urandom(2048))
    return p


def _ck_truncated(d, good):
    p = d / "truncated.pt"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return p


def _ck_foreign(d, good):  # a plain PyTorch state dict from some other program
    p = d / "foreign.pt"
    torch.save({"conv.weight": torch.zeros(4, 1, 3, 3)}, p)
    return p


def _ck_other_architecture(d, good):  # config says width 8, weights are width 4
    state = load_checkpoint(good)
    p = d / "other_arch.pt"
    save_checkpoint(p, dict(state, config={**state["config"], "g_width": 8}))
    return p


def _ck_future_config(d, good):  # a config field this version does not know
    state = load_checkpoint(good)
    p = d / "future.pt"
    save_checkpoint(p, dict(state, config={**state["config"], "hyper_drive": True}))
    return p


CHECKPOINTS = {"missing": _ck_missing, "folder": _ck_folder, "garbage": _ck_garbage,
               "truncated": _ck_truncated, "foreign_state_dict": _ck_foreign,
               "other_architecture": _ck_other_architecture, "future_config": _ck_future_config}


def checkpoint_argv(entry: str, bad_ckpt: Path, tmp_path: Path, c: Ctx) -> tuple[Callable, list]:
    """(main, argv) running `entry` with every input valid except the checkpoint."""
    inputs = tmp_path / "in"
    inputs.mkdir(exist_ok=True)
    scan = inputs / "chest.mhd"
    if not scan.exists():
        save_mhd(phantom_scan(), scan)
    out = tmp_path / "out"
    if entry == "protect":
        return protect.main, [scan, "-c", bad_ckpt, "-o", out, "--no-progress"]
    if entry == "GUI":
        return GUI.main, ["--scan", scan, "--checkpoint", bad_ckpt, "--models", c.empty_models, "--out", out]
    if entry == "evaluate":
        return evaluate.main, ["--methods", "mitsgan", "--checkpoint", bad_ckpt, "--data", inputs,
                               "--models", c.empty_models, "--out", out, "--device", "cpu"]
    return train.main, _train(inputs, out, c, "--resume", bad_ckpt)


@pytest.mark.parametrize("entry", ["protect", "evaluate", "GUI", "train"])
@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_bad_checkpoint(entry, case, ckpt, empty_models, tmp_path, capfd):
    c = Ctx(tmp_path, ckpt=ckpt, empty_models=empty_models)
    models = tmp_path / "models"
    models.mkdir()
    bad = CHECKPOINTS[case](models, ckpt)
    main, argv = checkpoint_argv(entry, bad, tmp_path, c)
    before = tree(tmp_path)
    res = call(main, argv, capfd)
    assert_refused(res, ModelFileError.exit_code, (bad.name,), tmp_path, before, entry)


# ==============================================================================================
# entry-point specific arguments
# ==============================================================================================
@pytest.mark.parametrize("coord", ["-1,20,20", "6,20,1e999", "6,nan,20", "12,20,20"])
def test_tamper_coordinates_outside_or_not_finite(coord, empty_models, tmp_path, capfd):
    scan = tmp_path / "in" / "chest.mhd"
    scan.parent.mkdir()
    save_mhd(phantom_scan(), scan)
    before = tree(tmp_path)
    res = call(tamper.main, ["-t", scan, "-d", tmp_path / "out", "-a", "remove", "-c", coord,
                             "--models", empty_models], capfd)
    assert_refused(res, CoordinateError.exit_code, ("coordinate",), tmp_path, before)


def test_gui_bad_protected_scan_and_window(empty_models, tmp_path, capfd):
    scan = tmp_path / "in" / "chest.mhd"
    scan.parent.mkdir()
    save_mhd(phantom_scan(), scan)
    before = tree(tmp_path)
    res = call(GUI.main, ["--scan", scan, "--protected", tmp_path / "in" / "gone.mhd",
                          "--models", empty_models, "--out", tmp_path / "out"], capfd)
    assert_refused(res, InputFileError.exit_code, ("gone.mhd",), tmp_path, before)
    res = call(GUI.main, ["--scan", scan, "--window", "400,-1000", "--models", empty_models], capfd)
    assert_refused(res, UsageError.exit_code, ("--window",), tmp_path, before)


def test_gui_actions_that_fail_keep_the_viewer_running(empty_models, tmp_path, capfd):
    """A save into an impossible folder or a click without attacker models: one 'error:' line
    and the status text, no traceback from the event loop, no file."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    from procedures.attacker.pipeline import ScanManipulator

    (tmp_path / "a_file").write_text("x")
    # 35 x 34 x 34 mm: CT-GAN's 32 mm cube fits, so the click reaches the missing model
    v = GUI.Viewer(phantom_scan(shape=(14, 48, 48)), ScanManipulator(empty_models),
                   tmp_path / "a_file" / "saved")
    v.build()
    before = tree(tmp_path)
    capfd.readouterr()
    try:
        v.on_key(SimpleNamespace(key="s"))
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: cannot write") and "a_file" in err, err
        assert v.status.startswith("error: ") and v.saved == []
        v.on_click(SimpleNamespace(inaxes=v.ax, button=1, xdata=20.0, ydata=20.0))
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "INJ" in err, err
        assert v.history["original"] == []
    finally:
        plt.close(v.fig)
    assert tree(tmp_path) == before


def _bad_out(kind: str, root: Path) -> Path:
    if kind == "through_regular_file":
        (root / "a_file").write_text("x")
        return root / "a_file" / "out"
    if kind == "is_a_file":
        (root / "out_file").write_text("x")
        return root / "out_file"
    p = root / "dangling_out"
    p.symlink_to(root / "gone")
    return p


@pytest.mark.parametrize("kind", ["through_regular_file", "is_a_file", "dangling_symlink"])
@pytest.mark.parametrize("entry", ["protect", "tamper", "GUI", "evaluate", "train"])
def test_output_folder_that_cannot_exist(entry, kind, ckpt, empty_models, tmp_path, capfd, request):
    """The output check comes before the work: nothing is protected/tampered/trained in vain."""
    scan = tmp_path / "in" / "chest.mhd"
    scan.parent.mkdir()
    save_mhd(phantom_scan(), scan)
    out = _bad_out(kind, tmp_path)
    c = Ctx(tmp_path, ckpt=ckpt, empty_models=empty_models)
    if entry == "evaluate":
        c.models = empty_models  # the output check precedes the attacker models
    main, argv = {**FILE_ENTRIES, **FOLDER_ENTRIES}[entry]
    arg = scan.parent if entry in FOLDER_ENTRIES else scan
    before = tree(tmp_path)
    res = call(main, argv(arg, out, c), capfd)
    assert_refused(res, OutputError.exit_code, (out.name,), tmp_path, before, entry)


# ==============================================================================================
# the set-up script: procedures.data.prepare --sdist <bad file>
# ==============================================================================================
def _sd_garbage(d):
    p = d / prepare_data.SDIST
    p.write_bytes(b"not the package")
    return p


def _sd_empty(d):
    p = d / "empty.tar.gz"
    p.write_bytes(b"")
    return p


SDISTS = {"missing": missing_file, "folder": folder_named_like_a_file, "through_regular_file": through_regular_file,
          "dangling_symlink": dangling_symlink, "garbage": _sd_garbage, "empty": _sd_empty}


@pytest.mark.parametrize("case", list(SDISTS))
def test_prepare_data_bad_sdist(case, tmp_path, capfd):
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad = SDISTS[case](inputs)
    before = tree(tmp_path)
    res = call(prepare_data.main, ["--data-dir", tmp_path / "data", "--cache", tmp_path / "cache",
                                   "--sdist", bad], capfd)
    assert_refused(res, DataFetchError.exit_code, (bad.name,), tmp_path, before)


def test_prepare_data_usage_error_is_one_line(tmp_path, capfd):
    before = tree(tmp_path)
    res = call(prepare_data.main, ["--data-dir", tmp_path, "--no-such-flag"], capfd)
    assert_refused(res, UsageError.exit_code, ("--no-such-flag",), tmp_path, before)


def test_prepare_data_output_folder_through_a_file(tmp_path, capfd):
    """With the real source package (cached by `make data`): a data folder that cannot be made."""
    cache = ROOT / ".cache"
    if not (cache / prepare_data.SDIST).is_file():
        pytest.skip("source package not cached (make data)")
    (tmp_path / "a_file").write_text("x")
    before = tree(tmp_path)
    res = call(prepare_data.main, ["--data-dir", tmp_path / "a_file" / "data", "--cache", cache], capfd)
    assert_refused(res, OutputError.exit_code, ("a_file",), tmp_path, before)


# ==============================================================================================
# the real scripts: exit status and one stderr line from a fresh interpreter
# ==============================================================================================
def test_scripts_in_subprocesses(ckpt, empty_models, tmp_path):
    """The root scripts (and the set-up module) as a user runs them, started together (2 cores);
    tamper.py's is in test_tamper_cli, evaluate.py ends like the others through run_cli."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    trunc = truncated_raw(inputs)
    series = dicom_missing_slice(inputs)
    py = sys.executable
    runs = {
        "protect": ([py, "protect.py", str(trunc), "-c", str(ckpt), "-o", str(tmp_path / "o1")], 4, trunc.name),
        "GUI": ([py, "GUI.py", "--scan", str(series), "--models", str(empty_models)], 4, series.name),
        "train": ([py, "train.py", *map(str, _train(tmp_path / "nope", tmp_path / "o2", Ctx(tmp_path,
                   empty_models=empty_models)))], 3, "nope"),
        "prepare_data": ([py, "-m", "procedures.data.prepare", "--data-dir", str(tmp_path / "o4"),
                          "--sdist", str(inputs / "gone.tar.gz")], 9, "gone.tar.gz"),
    }
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "default"}
    procs = {k: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, (cmd, _, _) in runs.items()}
    for k, p in procs.items():
        out, err = p.communicate(timeout=300)
        _, code, name = runs[k]
        lines = err.strip().splitlines()
        assert p.returncode == code, (k, p.returncode, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], (k, err)
        assert "Traceback" not in out + err
    left = sorted(os.listdir(tmp_path))
    assert left == ["in"]
