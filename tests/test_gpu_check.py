"""procedures.benchmarking.gpu_check (`make gpu-check`): its steps, its loud failures, and a CPU dry run."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import make_phantom
from procedures.benchmarking import gpu_check as gpu_check
from utils.errors import run_cli
from utils.scan_io import Scan, save_numpy

SPACING = (2.5, 0.7, 0.7)


@pytest.fixture
def npy_data(tmp_path):
    d = tmp_path / "scans"
    d.mkdir()
    for i in range(2):
        save_numpy(Scan(make_phantom((72, 64, 64), seed=i), SPACING, (0.0, 0.0, 0.0)), d / f"s{i}.npy")
    return d


def test_plan_runs_every_step_on_the_device_with_keras_on_torch(npy_data, tmp_path):
    args = SimpleNamespace(device="cuda", data=str(npy_data), models="models", out=str(tmp_path / "o"),
                           train_steps=300, quick=False)
    steps = gpu_check.plan(args, (72, 64, 64))
    assert [s.name for s in steps] == ["bench", "train", "evaluate", "protect", "tamper"]
    for s in steps:
        assert s.argv[0] == sys.executable and 0 < s.timeout_s <= 600
        assert "cuda" in s.argv, s.name
    joined = {s.name: " ".join(s.argv) for s in steps}
    assert "--keras_backend torch" in joined["bench"] and "--keras_backend torch" in joined["train"]
    assert "--preset whitebox" in joined["train"] and "--max_steps 300" in joined["train"]
    assert "--impl torch" in joined["tamper"] and "s0.npy" in joined["protect"]
    assert "attacker_impl=keras" in joined["bench"] and "amp=bf16" in joined["bench"]


def test_a_failing_step_stops_the_check_loudly(tmp_path, capsys):
    step = gpu_check.Step("boom", [sys.executable, "-c", "print('partial'); raise SystemExit(3)"], 60)
    with pytest.raises(gpu_check.StepFailed, match=r"'boom' FAILED \(exit 3[\s\S]*partial"):
        gpu_check.run_step(step, tmp_path)
    slow = gpu_check.Step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1)
    with pytest.raises(gpu_check.StepFailed, match="timed out after 1 s"):
        gpu_check.run_step(slow, tmp_path)
    assert run_cli(gpu_check.main, ["--device", "cpu", "--data", str(tmp_path / "none")]) != 0
    assert "error" in capsys.readouterr().err


def test_export_npy_writes_what_the_loader_reads(tmp_path):
    from utils.scan_io import load_scan, save_mhd

    src = tmp_path / "src"
    src.mkdir()
    save_mhd(Scan(make_phantom((8, 32, 32)), SPACING, (1.0, 2.0, 3.0)), src / "a.mhd")
    (src / "nodules.csv").write_text("z,y,x\n")
    assert gpu_check.main(["--data", str(src), "--export-npy", str(tmp_path / "npy")]) == 0
    got = load_scan(tmp_path / "npy" / "a.npy")
    np.testing.assert_array_equal(got.hu, make_phantom((8, 32, 32)))
    np.testing.assert_allclose(got.spacing, SPACING)
    assert (tmp_path / "npy" / "nodules.csv").is_file()


@pytest.mark.slow
@pytest.mark.tf
def test_cpu_dry_run_of_every_step(npy_data, tiny_ctgan_models, tmp_path):
    out = tmp_path / "check"
    assert gpu_check.main(["--device", "cpu", "--quick", "--data", str(npy_data),
                           "--models", str(tiny_ctgan_models), "--out", str(out)]) == 0
    assert (out / "bench" / "bench.json").is_file() and (out / "train" / "checkpoint.pt").is_file()
    assert (out / "eval" / "results.md").is_file() and (out / "protect" / "s0_protected.mhd").is_file()  # .npy stem
    assert (out / "tamper" / "s0_tampered.npy").is_file()
