"""Builders and entry-point table shared by the bad-input suites (test_bad_inputs.py and
test_hostile_inputs.py): each entry point with the argv it is called with, and small writers of
tiny scans and DICOM series to corrupt. Fixtures they need (ckpt, empty_models,
held_ctgan_models) are in conftest.py."""
from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest

import evaluate
import GUI
import protect
import tamper
import train
import verify
from helpers import Ctx, phantom_scan
from helpers import train_argv as _train
from utils.scan_io import save_dicom_series, save_mhd


def _mhd(d: Path, name: str, **kw) -> Path:
    p = d / name
    save_mhd(phantom_scan(**kw), p)
    return p


def _edit_header(p: Path, key: str, value: str) -> Path:
    text = p.read_text()
    text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    assert n == 1
    p.write_text(text)
    return p


def _series(d: Path, name: str, seed: int = 0, desc: str = "source", **kw) -> tuple[Path, list[Path]]:
    p = d / name
    save_dicom_series(phantom_scan(seed, **kw), p, series_description=desc)
    return p, sorted(p.iterdir())


def _edit_dicom(path: Path, **changes):
    ds = pydicom.dcmread(path)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)


# entry point -> (main, argv builder(input, out, ctx)); `input` is a scan for file entry points
# and a data folder for train/evaluate.
def _protect(scan, out, c):
    return [scan, "-c", c.ckpt, "-o", out, "--no-progress"]


def _tamper(scan, out, c):
    return ["-t", scan, "-d", out, "-a", "inject", "-c", "6,20,20", "--models", c.empty_models]


def _gui(scan, out, c):
    return ["--scan", scan, "--models", c.empty_models, "--out", out]


def _evaluate(data, out, c, *extra):
    return ["--methods", "noise", "--noise-rms", "5", "--actions", "inject", "--data", data,
            "--models", c.models, "--out", out, "--no-progress", "--no-figures", "--device", "cpu", *extra]


def _verify(scan, out, c):
    return [scan, "--key", c.key, "-o", out]


FILE_ENTRIES = {"protect": (protect.main, _protect), "tamper": (tamper.main, _tamper), "GUI": (GUI.main, _gui),
                "verify": (verify.main, _verify)}
FOLDER_ENTRIES = {"train": (train.main, _train), "evaluate": (evaluate.main, _evaluate)}


def _ctx(request, tmp_path, entry) -> Ctx:
    c = Ctx(tmp_path)
    c.empty_models = request.getfixturevalue("empty_models")
    if entry == "protect":
        c.ckpt = request.getfixturevalue("ckpt")
    if entry == "evaluate":
        c.models = request.getfixturevalue("held_ctgan_models")
    if entry == "verify":
        from utils.keyfile import make_key

        c.key = make_key(tmp_path / "seal.key")
    return c


def _entry_param(entry, case):
    marks = [pytest.mark.tf] if entry == "evaluate" else []
    return pytest.param(entry, case, id=f"{entry}-{case}", marks=marks)
