"""bench.py: a tiny end-to-end run of every section on the CPU, and its helpers."""
import json

import numpy as np
import pytest

import bench
from procedures.benchmarking import benchmark as benchmark
from utils.phantom import phantom
from utils.errors import UsageError


def test_eligible_subbatches_follow_the_published_near_end_rule():
    # 32 < s and s + 32 < depth, s = 4k: the first eligible s is 36 (docs/training.md#near-end-rule).
    assert benchmark.eligible_subbatches(68, 4) == []
    assert benchmark.eligible_subbatches(69, 4) == [9]
    assert benchmark.eligible_subbatches(95, 4) == list(range(9, 16))   # lung1 at 2.5 mm: 7 sub-batches
    assert benchmark.eligible_subbatches(121, 4) == list(range(9, 23))  # lung2: 14


def test_specs_parse_into_typed_config_fields():
    preset, kv = benchmark.parse_spec("paper:amp=bf16:channels_last=true:g_width=8")
    assert preset == "paper"
    assert benchmark.typed_overrides(kv) == {"amp": "bf16", "channels_last": True, "g_width": 8}
    with pytest.raises(UsageError):
        benchmark.typed_overrides({"no_such_field": "1"})
    with pytest.raises(UsageError):
        benchmark.parse_spec("paper:amp")


def test_phantom_is_a_chest_like_int16_volume():
    vol = phantom((12, 64, 64), seed=0)
    assert vol.dtype == np.int16 and vol.shape == (12, 64, 64)
    assert vol[6, 0, 0] < -900                       # air
    assert -950 < np.median(vol[6, 32, 18]) < -750   # lung
    assert 0 < vol[6, 8:56, 28:36].mean() < 100      # soft tissue between the lungs
    assert np.array_equal(vol, phantom((12, 64, 64), seed=0))


def test_tiny_benchmark_without_tensorflow(tiny_ctgan_models, tmp_path):
    """Training with the white-box (PyTorch) attacker, and protection: no Keras needed."""
    out = tmp_path / "bench"
    rc = bench.main(["--size", "64", "--depth", "72", "--protect_slices", "8", "--device", "cpu",
                     "--models_dir", str(tiny_ctgan_models), "--steps", "1", "--warmup", "0",
                     "--sections", "train,protect", "--reference", "", "--out", str(out),
                     "--train", "whitebox:g_width=4:d_width=4:batch=2",
                     "--protect", "whitebox:g_width=4:batch=3:channels_last=true"])
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())
    (row,) = res["train"]
    assert "error" not in row, row
    assert row["attack_mode"] == "whitebox" and row["batch"] == 2
    assert row["attacker"] == {"computed": 2, "of": 2, "errors": {}}   # 1 step x 2 slabs
    assert row["step_s"] > 0 and row["slices_per_s"] > 0
    (prot,) = res["protect"]
    assert "error" not in prot and prot["slices_per_s"] > 0
    assert "speed-up vs reference" in (out / "bench.md").read_text()


@pytest.mark.slow
@pytest.mark.tf
def test_tiny_benchmark_end_to_end(tiny_ctgan_models, tmp_path):
    """Every section, the reference preset (Keras attacker, float64, re-read) included (~1 min)."""
    out = tmp_path / "bench"
    rc = bench.main(["--size", "64", "--depth", "72", "--protect_slices", "8", "--device", "cpu",
                     "--models_dir", str(tiny_ctgan_models), "--steps", "1", "--warmup", "1",
                     "--tamper_reps", "1", "--out", str(out),
                     "--train", "paper:g_width=4:g_blocks=1,paper:g_width=4:g_blocks=1:attacker_impl=torch",
                     "--reference", "reference:g_width=4:g_blocks=1",
                     "--protect", "demo:g_width=4:batch=2,demo:g_width=4:batch=2:channels_last=true:slices=4"])
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())
    ref, ours, ours_torch = res["train"]
    assert ref["is_reference"] and ref["dtype"] == "float64" and ours["dtype"] == "float32"
    for row in (ref, ours, ours_torch):
        assert "error" not in row, row
        # the slab passes the near-end rule (s = 36 of 72 slices): every configuration ran its attacker
        assert row["sub_batches"] == [9, 9] and row["attacker"]["computed"] == 2
        assert row["gd_s"] > 0 and row["attack_s"] > 0
        assert row["memory"]["rss_peak_mb"] > 0
    assert ours["speedup_vs_reference"] > 0
    full, part = res["protect"]
    assert "error" not in full and "error" not in part
    assert full["shape"] == [8, 64, 64] and part["shape"] == [4, 64, 64]
    assert full["gflop_per_slice"] > 0 and 0 < full["peak_fraction"] < 1
    assert full["voxels_changed"] > 0.5            # a real (random) perturbation was applied
    keras_row, torch_man_row, torch_row = res["tamper"]
    assert "error" not in keras_row and "error" not in torch_man_row and "error" not in torch_row
    assert keras_row["inject_ms"] > 0 and torch_man_row["remove_ms"] > 0 and torch_row["remove_fwd_bwd_ms"] > 0
    assert keras_row["generator_ms"] > 0 and torch_man_row["generator_ms"] > 0
    md = (out / "bench.md").read_text()
    assert "speed-up vs reference" in md and "(reference)" in md and "GFLOP/slice" in md
