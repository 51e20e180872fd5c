"""Nothing lost, valid and private DICOM (docs/safety.md#nothing-is-lost, #valid-private-dicom).

- Every entry point leaves its inputs byte-for-byte unchanged (hashed before and after).
- Outputs and checkpoints reach their final names only by a rename from a temporary name in
  the same folder (os.replace is watched).
- A training run killed with SIGKILL (mid-checkpoint, and at a random moment) resumes from the
  last good checkpoint and ends with exactly the weights of an uninterrupted run.
- A full disk or a read-only output folder (real tmpfs mounts when this runs as root, else
  skipped: test_scan_io covers the same paths with monkeypatched writes) gives one clear line
  and leaves no partial file.
- Every DICOM series we write passes dciodvfy, keeps the source's patient and study, gets new
  series/instance UIDs; patient names and IDs never reach stdout, stderr, logs or the non-DICOM
  files of an output folder, on success or on error.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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
from helpers import Ctx, call, tree  # noqa: E402
from helpers import train_argv as _train  # noqa: E402
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from utils.errors import OutputError  # noqa: E402
from utils.scan_io import Scan, load_scan, save_dicom_series, save_mhd, validate_dicom  # noqa: E402

SPACING = (2.5, 0.7, 0.7)
SECRET_NAME, SECRET_ID = "SECRET^NAME", "ID12345"
SECRETS = (SECRET_NAME, SECRET_ID, "SECRET", "NAME^SECRET")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from helpers import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("lost_ckpt"))


def _inputs(tmp_path: Path, shape=(20, 48, 48)) -> Path:
    p = tmp_path / "in" / "chest.mhd"
    p.parent.mkdir(parents=True, exist_ok=True)
    save_mhd(Scan(make_phantom(shape, seed=4), SPACING, (3.0, -2.0, 1.0)), p)
    return p


@contextlib.contextmanager
def watch_renames(monkeypatch):
    """Record every os.replace(src, dst) (the only way our writers publish a file)."""
    seen: list[tuple[Path, Path]] = []
    real = os.replace

    def replace(src, dst, *a, **k):
        seen.append((Path(src).absolute(), Path(dst).absolute()))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    yield seen
    monkeypatch.setattr(os, "replace", real)


def assert_published_by_rename(path: Path, seen: list[tuple[Path, Path]]):
    """`path` (a file, or a file inside a folder renamed as a whole) got its name by a rename
    from a temporary name beside it."""
    path = path.absolute()
    for src, dst in seen:
        if dst == path or dst in path.parents:
            assert dst.parent in src.parents or src.parent == dst.parent, (src, dst)
            assert src.name.startswith(".") or ".tmp" in src.name or any(
                ".tmp" in part for part in src.relative_to(dst.parent).parts), (src, dst)
            return
    raise AssertionError(f"{path} was not written by a rename; renames: {seen}")


# ==============================================================================================
# inputs are never modified; outputs appear by rename
# ==============================================================================================
def test_protect_leaves_inputs_and_renames_outputs(ckpt, tmp_path, capfd, monkeypatch):
    scan = _inputs(tmp_path)
    series = save_dicom_series(load_scan(scan), tmp_path / "in" / "series")
    inputs = {"scan": tree(scan.parent), "ckpt": tree(ckpt.parent)}
    with watch_renames(monkeypatch) as seen:
        res = call(protect.main, [scan, "-c", ckpt, "-o", tmp_path / "out", "--no-progress"], capfd)
        assert res.rc == 0, res.err
        res = call(protect.main, [series, "-c", ckpt, "-o", tmp_path / "out", "--no-progress"], capfd)
        assert res.rc == 0, res.err
    assert {"scan": tree(scan.parent), "ckpt": tree(ckpt.parent)} == inputs
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["chest_protected.mhd", "chest_protected.raw", "series_protected"]
    for f in ("chest_protected.mhd", "chest_protected.raw", "series_protected"):
        assert_published_by_rename(out / f, seen)


@pytest.mark.tf
def test_tamper_gui_evaluate_leave_inputs(ckpt, tiny_ctgan_models, tmp_path, capfd, monkeypatch):
    scan = _inputs(tmp_path)
    models_before = tree(tiny_ctgan_models)
    before = tree(scan.parent)
    with watch_renames(monkeypatch) as seen:
        res = call(tamper.main, ["-t", scan, "-d", tmp_path / "t", "-a", "inject", "-c", "10,24,30",
                                 "--models", tiny_ctgan_models], capfd)
        assert res.rc == 0, res.err
        for f in ("chest_tampered.mhd", "chest_tampered.raw"):
            assert_published_by_rename(tmp_path / "t" / f, seen)

        viewers = []

        class Recorder(GUI.Viewer):
            def build(self, fig=None):
                viewers.append(self)
                return super().build(fig)

        def show(*a, **k):  # the user: one click on the protected scan, then "s"
            v = viewers[-1]
            v.toggle_volume()
            v.tamper(24, 30)
            v.save()

        monkeypatch.setattr(GUI, "Viewer", Recorder)
        monkeypatch.setattr("matplotlib.pyplot.show", show)
        res = call(GUI.main, ["--scan", scan, "--checkpoint", ckpt, "--models", tiny_ctgan_models,
                              "--out", tmp_path / "g"], capfd)
        assert res.rc == 0, res.err
        saved = viewers[-1].saved
        assert [p.name for p in saved] == ["chest_protected_tampered_001.mhd"]
        assert_published_by_rename(saved[0], seen)
        import matplotlib.pyplot as plt
        plt.close("all")

        res = call(evaluate.main, ["--methods", "noise", "--noise-rms", "5", "-n", "1", "--actions", "inject",
                                   "--data", scan.parent, "--models", tiny_ctgan_models, "--out", tmp_path / "e",
                                   "--no-progress", "--device", "cpu"], capfd)
        assert res.rc == 0, res.err
        for f in ("results.md", "results.csv", "results.json"):
            assert_published_by_rename(tmp_path / "e" / f, seen)
    assert tree(scan.parent) == before
    assert tree(tiny_ctgan_models) == models_before


def test_train_leaves_inputs_and_renames_checkpoints(ckpt, tmp_path, capfd, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        save_mhd(Scan(make_phantom((12, 32, 32), seed=i), SPACING, (0.0, 0.0, 0.0)), data / f"v{i}.mhd")
    models = tmp_path / "models"
    for sub in ("INJ", "REM"):
        (models / sub).mkdir(parents=True)
    start = tmp_path / "start.pt"
    shutil.copy(ckpt, start)
    before = (tree(data), tree(models), start.read_bytes())
    out = tmp_path / "run"
    with watch_renames(monkeypatch) as seen:
        res = call(train.main, ["--preset", "demo", "--data_dir", data, "--models_dir", models, "--out_dir", out,
                                "--g_width", "4", "--d_width", "4", "--progress", "false", "--sample_every", "1",
                                "--max_steps", "2", "--ckpt_every", "1", "--save_img_result", "true"], capfd)
        assert res.rc == 0, res.err
        # Resuming from a checkpoint elsewhere never writes to it.
        res = call(train.main, ["--resume", start, "--out_dir", tmp_path / "run2", "--max_steps", "2",
                                "--progress", "false", "--save_img_result", "false"], capfd)
        assert res.rc == 0, res.err
    assert (tree(data), tree(models), start.read_bytes()) == before
    published = [out / "checkpoint.pt", out / "config.json", tmp_path / "run2" / "checkpoint.pt",
                 *sorted((out / "protected").iterdir()), *sorted((out / "samples").iterdir())]
    for f in published:
        assert_published_by_rename(f, seen)
    left = [p.name for p in out.rglob("*") if ".tmp" in p.name]
    assert not left, left


# ==============================================================================================
# SIGKILL during training: resume from the last good checkpoint, same weights
# ==============================================================================================
def _train_cmd(data: Path, models: Path, out: Path, steps: int, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--preset", "demo", "--data_dir", str(data),
            "--models_dir", str(models), "--out_dir", str(out), "--g_width", "4", "--d_width", "4",
            "--progress", "false", "--sample_every", "0", "--ckpt_every", "1", "--max_steps", str(steps),
            "--save_img_result", "false", *extra]


def _popen(cmd, log: Path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    f = open(log, "ab")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), f


def _kill_when(p, ckpt: Path, how: str, rng: np.random.Generator, min_step: int) -> int:
    """SIGKILL `p` once checkpoint.pt holds step >= min_step: 'mid-write' as soon as the
    temporary checkpoint appears, 'random' after a random delay. Returns the returncode."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        if ckpt.exists():
            with contextlib.suppress(Exception):  # being replaced right now: look again
                if load_checkpoint(ckpt)["step"] >= min_step:
                    break
        time.sleep(0.01)
    if how == "mid-write":
        while time.monotonic() < deadline and p.poll() is None and not tmp.exists():
            time.sleep(0.0002)
    else:
        time.sleep(float(rng.uniform(0.0, 0.4)))
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    return p.wait(timeout=60)


def _same_state(a: dict, b: dict):
    assert a["step"] == b["step"]
    for net in ("generator", "discriminator"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    for opt in ("opt_G", "opt_D"):
        for pid, st in a[opt]["state"].items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[opt]["state"][pid][k])), (opt, pid, k)


def _kill_and_resume(tmp_path: Path, models: Path, steps: int, kills, *extra):
    """Train `steps` steps in a subprocess killed once per entry of `kills` ('mid-write' or
    'random'), each time resumed with --resume auto, then to the end; compare with an
    uninterrupted run (in this process: same code, same thread count, same CPU kernels)."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        save_mhd(Scan(make_phantom((16, 40, 40), seed=i), SPACING, (-40.0 * i, 10.0, -20.0)), data / f"vol{i}.mhd")
    full_out, cut_out = tmp_path / "full", tmp_path / "cut"
    rng = np.random.default_rng(20260)  # fixed: a failure reruns with the same kill delays
    ckpt = cut_out / "checkpoint.pt"
    log = tmp_path / "cut.log"
    cut_steps = []
    for attempt, how in enumerate(kills):
        cmd = _train_cmd(data, models, cut_out, steps, *extra) + (["--resume", "auto"] if attempt else [])
        p, f = _popen(cmd, log)
        with f:
            rc = _kill_when(p, ckpt, how, rng, min_step=(cut_steps[-1] + 1 if cut_steps else 1))
        assert rc == -signal.SIGKILL, f"run {attempt} ended ({rc}) before it was killed: {log.read_text()[-2000:]}"
        state = load_checkpoint(ckpt)  # never partial: the last good checkpoint
        assert 1 <= state["step"] < steps
        cut_steps.append(state["step"])
    p, f = _popen(_train_cmd(data, models, cut_out, steps, *extra, "--resume", "auto"), log)
    with f:
        # the uninterrupted run, meanwhile, here
        assert train.main(_train_cmd(data, models, full_out, steps, *extra)[2:]) == 0
        assert p.wait(timeout=600) == 0, log.read_text()[-3000:]
    _same_state(load_checkpoint(full_out / "checkpoint.pt"), load_checkpoint(ckpt))
    assert not (cut_out / "checkpoint.pt.tmp").exists()  # the final save replaced the killed one's
    return cut_steps


@pytest.mark.slow
def test_sigkill_mid_checkpoint_then_resume_gives_the_same_weights(tmp_path):
    """Killed while writing a checkpoint; no attacker (empty model folders), to stay fast."""
    models = tmp_path / "no_models"
    for sub in ("INJ", "REM"):
        (models / sub).mkdir(parents=True)
    assert len(_kill_and_resume(tmp_path, models, 6, ["mid-write"])) == 1


@pytest.mark.slow
def test_sigkill_twice_with_the_ctgan_attacker_in_the_loop(tmp_path):
    """Tiny CT-GAN models through the PyTorch port (white box), killed mid-write and at a random
    moment: the attacker's draws resume too."""
    from conftest import build_tiny_ctgan_models

    models = build_tiny_ctgan_models(tmp_path / "models")
    assert len(_kill_and_resume(tmp_path, models, 9, ["mid-write", "random"], "--attack_mode", "whitebox")) == 2


# ==============================================================================================
# full disk, read-only folder (real tmpfs mounts; root only)
# ==============================================================================================
@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64k", ro: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size},mode=0755" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]}); test_scan_io covers the "
                    f"same failures with monkeypatched writes")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _one_line(res, code):
    assert res.exc is None, res.exc
    lines = res.err.strip().splitlines()
    assert res.rc == code and len(lines) == 1 and lines[0].startswith("error: "), res.err
    return lines[0]


def test_full_disk_protect_leaves_no_partial_file(ckpt, tmp_path, capfd):
    scan = _inputs(tmp_path, shape=(20, 64, 64))            # 160 kB of int16: does not fit in 64 kB
    before = tree(scan.parent)
    with tmpfs(tmp_path / "full") as disk:
        res = call(protect.main, [scan, "-c", ckpt, "-o", disk, "--no-progress"], capfd)
        line = _one_line(res, OutputError.exit_code)
        assert "chest_protected" in line and ("no space" in line.lower() or "space left" in line.lower()), line
        assert os.listdir(disk) == []
    assert tree(scan.parent) == before


def test_full_disk_mid_training_keeps_the_last_good_checkpoint(ckpt, tmp_path):
    state = load_checkpoint(ckpt)
    size = ckpt.stat().st_size
    with tmpfs(tmp_path / "full", size=str(int(size * 1.5))) as disk:
        path = disk / "checkpoint.pt"
        save_checkpoint(path, state)                       # fits once
        state2 = dict(state, step=state["step"] + 1)
        with pytest.raises(OutputError) as e:              # the temporary second copy does not
            save_checkpoint(path, state2)
        assert "\n" not in str(e.value) and "checkpoint.pt" in str(e.value) and "space" in str(e.value)
        assert sorted(os.listdir(disk)) == ["checkpoint.pt"]
        assert load_checkpoint(path)["step"] == state["step"]


@pytest.mark.parametrize("entry", ["protect", "tamper", "GUI", "evaluate", "train"])
def test_read_only_output_folder(entry, ckpt, tmp_path, capfd):
    scan = _inputs(tmp_path)
    models = tmp_path / "no_models"
    c = Ctx(tmp_path, ckpt=ckpt, empty_models=models, models=models)
    before = tree(scan.parent)
    with tmpfs(tmp_path / "ro", ro=True) as ro:
        out = ro / "out"
        argv = {"protect": (protect.main, [scan, "-c", ckpt, "-o", out]),
                "tamper": (tamper.main, ["-t", scan, "-d", out, "-a", "inject", "-c", "10,24,24", "--models", models]),
                "GUI": (GUI.main, ["--scan", scan, "--models", models, "--out", out]),
                "evaluate": (evaluate.main, ["--methods", "noise", "--noise-rms", "5", "--data", scan.parent,
                                             "--models", models, "--out", out]),
                "train": (train.main, _train(scan.parent, out, c))}[entry]
        res = call(*argv, capfd)
        line = _one_line(res, OutputError.exit_code)
        assert "read-only file system" in line and "out" in line, line
        assert os.listdir(ro) == []
    assert tree(scan.parent) == before


# ==============================================================================================
# valid, private DICOM
# ==============================================================================================
def secret_series(folder: Path, shape=(20, 48, 48), seed=5) -> Path:
    """A CT series of a patient called SECRET^NAME, ID ID12345 (and more identity)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    src = Dataset()
    src.PatientName, src.PatientID = SECRET_NAME, SECRET_ID
    src.PatientBirthDate, src.PatientSex = "19700101", "F"
    src.StudyInstanceUID, src.StudyID, src.AccessionNumber = generate_uid(), "S1", "ACC1"
    src.StudyDate, src.StudyTime = "20240102", "101010"
    src.FrameOfReferenceUID = generate_uid()
    src.InstitutionName, src.Manufacturer = "General Hospital", "ACME"
    scan = Scan(make_phantom(shape, seed=seed), SPACING, (-30.0, 12.5, -40.0), dicom_headers=[src])
    folder.parent.mkdir(parents=True, exist_ok=True)
    return save_dicom_series(scan, folder, series_description="chest")


def _non_dicom_texts(root: Path) -> list[tuple[str, bytes]]:
    out = []
    for p in root.rglob("*"):
        if p.is_file():
            b = p.read_bytes()
            if b[128:132] != b"DICM":  # DICOM outputs carry the identity on purpose
                out.append((str(p), b))
    return out


def assert_private(res, caplog, *roots: Path):
    texts = [("stdout", res.out.encode()), ("stderr", res.err.encode()), ("log", caplog.text.encode()),
             ("warnings", "\n".join(res.warned).encode())]
    for r in roots:
        if r.exists():
            texts += _non_dicom_texts(r)
    for where, b in texts:
        for s in SECRETS:
            assert s.encode() not in b, f"{s!r} found in {where}"


def assert_valid_derived_series(out: Path, src: Path):
    src_ds = pydicom.dcmread(sorted(src.iterdir())[0])
    files = sorted(out.iterdir())
    ds = [pydicom.dcmread(f) for f in files]
    errors = validate_dicom(out)
    if errors is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) not installed")
    assert errors == [], errors[:5]
    for d in ds:
        assert str(d.PatientName) == SECRET_NAME and d.PatientID == SECRET_ID
        assert d.PatientBirthDate == src_ds.PatientBirthDate
        assert d.StudyInstanceUID == src_ds.StudyInstanceUID and d.AccessionNumber == src_ds.AccessionNumber
        assert d.FrameOfReferenceUID == src_ds.FrameOfReferenceUID
        assert d.SeriesInstanceUID != src_ds.SeriesInstanceUID
        assert "DERIVED" in d.ImageType
    assert len({d.SeriesInstanceUID for d in ds}) == 1
    src_sops = {pydicom.dcmread(f).SOPInstanceUID for f in src.iterdir()}
    sops = {d.SOPInstanceUID for d in ds}
    assert len(sops) == len(ds) and not sops & src_sops


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def test_protect_dicom_valid_identity_kept_nothing_printed(ckpt, tmp_path, capfd, logs):
    src = secret_series(tmp_path / "in" / "series")
    before = tree(src)
    res = call(protect.main, [src, "-c", ckpt, "-o", tmp_path / "out", "--format", "dicom"], capfd)
    assert res.rc == 0, res.err
    assert_valid_derived_series(tmp_path / "out" / "series_protected", src)
    assert_private(res, logs, tmp_path / "out")
    assert tree(src) == before
    # An .mhd input written as DICOM (synthetic identity) is valid too.
    scan = _inputs(tmp_path)
    res = call(protect.main, [scan, "-c", ckpt, "-o", tmp_path / "out2", "--format", "dicom"], capfd)
    assert res.rc == 0, res.err
    assert validate_dicom(tmp_path / "out2" / "chest_protected") == []


@pytest.mark.tf
def test_tamper_dicom_valid_identity_kept_nothing_printed(tiny_ctgan_models, tmp_path, capfd, logs):
    src = secret_series(tmp_path / "in" / "series")
    before = tree(src)
    res = call(tamper.main, ["-t", src, "-d", tmp_path / "out", "-a", "inject", "-c", "10,24,30",
                             "--models", tiny_ctgan_models], capfd)
    assert res.rc == 0, res.err
    out = tmp_path / "out" / "series_tampered"
    assert_valid_derived_series(out, src)
    assert (load_scan(out).hu != load_scan(src).hu).any()
    assert_private(res, logs, tmp_path / "out")
    scan = _inputs(tmp_path)
    res = call(tamper.main, ["-t", scan, "-d", tmp_path / "out2", "-a", "remove", "-c", "10,24,30", "-f", "dicom",
                             "--models", tiny_ctgan_models], capfd)
    assert res.rc == 0, res.err
    assert validate_dicom(tmp_path / "out2" / "chest_tampered") == []
    assert tree(src) == before


@pytest.mark.tf
def test_gui_evaluate_train_never_print_patient_identity(ckpt, tiny_ctgan_models, tmp_path, capfd, logs,
                                                         monkeypatch):
    data = tmp_path / "data"
    src = secret_series(data / "series")
    before = tree(data)
    # GUI: protect on start, one click, save as DICOM.
    viewers = []

    class Recorder(GUI.Viewer):
        def build(self, fig=None):
            viewers.append(self)
            return super().build(fig)

    monkeypatch.setattr(GUI, "Viewer", Recorder)
    monkeypatch.setattr("matplotlib.pyplot.show", lambda *a, **k: (viewers[-1].tamper(24, 30), viewers[-1].save()))
    res = call(GUI.main, ["--scan", src, "--checkpoint", ckpt, "--models", tiny_ctgan_models,
                          "--out", tmp_path / "gui", "--format", "dicom"], capfd)
    assert res.rc == 0, res.err
    assert_valid_derived_series(viewers[-1].saved[0], src)
    assert_private(res, logs, tmp_path / "gui")
    import matplotlib.pyplot as plt
    plt.close("all")
    # evaluate: reports and figures.
    res = call(evaluate.main, ["--methods", "noise", "--noise-rms", "5", "-n", "1", "--actions", "remove",
                               "--data", data, "--models", tiny_ctgan_models, "--out", tmp_path / "eval",
                               "--no-progress", "--device", "cpu"], capfd)
    assert res.rc == 0, res.err
    assert_private(res, logs, tmp_path / "eval")
    # train with exports (the exported DICOM keeps the identity; nothing else shows it).
    models = tmp_path / "no_models"
    for sub in ("INJ", "REM"):
        (models / sub).mkdir(parents=True)
    res = call(train.main, ["--preset", "demo", "--data_dir", data, "--models_dir", models, "--out_dir",
                            tmp_path / "run", "--g_width", "4", "--d_width", "4", "--max_steps", "2",
                            "--sample_every", "1", "--progress", "true", "--save_img_result", "true"], capfd)
    assert res.rc == 0, res.err
    assert_valid_derived_series(tmp_path / "run" / "protected" / "series_protected_dicom", src)
    assert_private(res, logs, tmp_path / "run")
    assert tree(data) == before


def _broken_secret(kind: str, folder: Path) -> Path:
    src = secret_series(folder, shape=(12, 40, 40))
    files = sorted(src.iterdir())
    if kind == "missing_slice":
        files[4].unlink()
    elif kind == "not_ct":
        for f in files:
            ds = pydicom.dcmread(f)
            ds.Modality = "MR"
            ds.save_as(f, enforce_file_format=True)
    elif kind == "bad_position":
        ds = pydicom.dcmread(files[3])
        del ds.ImagePositionPatient
        ds.save_as(files[3], enforce_file_format=True)
    elif kind == "two_series":
        other = secret_series(folder.parent / "other", shape=(12, 40, 40), seed=6)
        for f in other.iterdir():
            f.rename(src / f"b_{f.name}")
        other.rmdir()
    return src


@pytest.mark.parametrize("kind", ["missing_slice", "not_ct", "bad_position", "two_series"])
def test_errors_never_print_patient_identity(kind, ckpt, tmp_path, capfd, logs):
    src = _broken_secret(kind, tmp_path / "data" / "series")
    models = tmp_path / "no_models"
    for sub in ("INJ", "REM"):
        (models / sub).mkdir(parents=True)
    c = Ctx(tmp_path, ckpt=ckpt, empty_models=models)
    runs = [(protect.main, [src, "-c", ckpt, "-o", tmp_path / "o1"]),
            (tamper.main, ["-t", src, "-d", tmp_path / "o2", "-a", "inject", "-c", "5,20,20", "--models", models]),
            (GUI.main, ["--scan", src, "--models", models, "--out", tmp_path / "o3"]),
            (train.main, _train(src.parent, tmp_path / "o4", c))]
    for main, argv in runs:
        res = call(main, argv, capfd)
        assert res.rc == 4 and res.err.startswith("error: "), res.err
        assert_private(res, logs, tmp_path / "o1", tmp_path / "o2", tmp_path / "o3", tmp_path / "o4")


def test_invalid_patient_values_are_not_echoed(ckpt, tmp_path, capfd, logs):
    """pydicom prints an invalid value when it validates it ("Invalid value for VR DA:
    '1970-01-01'"): our DICOM reader and writer must not let it, for patient attributes."""
    import warnings

    from pydicom.dataset import Dataset

    with warnings.catch_warnings():  # building the bad header here warns, by design
        warnings.simplefilter("ignore")
        src = Dataset()
        src.PatientName, src.PatientID = SECRET_NAME, SECRET_ID
        src.PatientBirthDate, src.PatientSex = "1970-01-01", "hidden"
    logs.clear()  # pydicom also logged those warnings
    scan = Scan(make_phantom((12, 40, 40), seed=2), SPACING, (0.0, 0.0, 0.0), dicom_headers=[src])
    (tmp_path / "in").mkdir()
    series = save_dicom_series(scan, tmp_path / "in" / "series")
    res = call(protect.main, [series, "-c", ckpt, "-o", tmp_path / "out"], capfd)
    assert res.rc == 0, res.err
    sorted(series.iterdir())[5].unlink()
    res2 = call(protect.main, [series, "-c", ckpt, "-o", tmp_path / "out2"], capfd)
    assert res2.rc == 4
    for r in (res, res2):
        text = r.out + r.err + logs.text + "\n".join(r.warned)
        for s in ("1970-01-01", "hidden", *SECRETS):
            assert s not in text, s
    out = pydicom.dcmread(sorted((tmp_path / "out" / "series_protected").iterdir())[0])
    assert out.PatientBirthDate == "1970-01-01" and out.PatientSex == "hidden"  # kept verbatim
