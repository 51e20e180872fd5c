"""procedures.evaluation.aggregate: mean and range of the held-out table over several
evaluate.py runs, on synthetic results.json files."""
import json

import pytest

from helpers import call
from procedures.evaluation import aggregate as A
from utils.errors import UsageError

SETTINGS = {"locations": "lung", "n_locations": 12, "seed": 0, "actions": ["inject", "remove"],
            "window": [-1000.0, 400.0]}
METHODS = [["mitsgan", "MITS-GAN (demo, unet)"], ["noise", "noise (MITS-GAN's RMS)"],
           ["signs", "random signs"]]


def _dis(total, inject, remove, ssim=0.9, attack=170.0):
    return {"n": 24, "disruption_rmse_hu": total, "disruption_inject": inject,
            "disruption_remove": remove, "ssim_tampered_vs_unprotected": ssim,
            "attack_rmse_hu": attack}


def _doc(mits, signs, rms, unseen_mits=None, settings=None, methods=METHODS, max_hu=877):
    """One run: `mits` and `signs` seen disruptions; unseen ones optional."""
    per_seen = {"MITS-GAN (demo, unet)": _dis(mits, mits - 5, mits + 5, ssim=0.88),
                "noise (MITS-GAN's RMS)": _dis(mits + 1, mits, mits + 2),
                "random signs": _dis(signs, signs - 4, signs + 4, ssim=0.97)}
    disruption = {"seen": per_seen}
    if unseen_mits is not None:
        disruption["unseen"] = {k: dict(v) for k, v in per_seen.items()}
        disruption["unseen"]["MITS-GAN (demo, unet)"] = _dis(unseen_mits, unseen_mits, unseen_mits)
    pert = {"MITS-GAN (demo, unet)": {"rms_hu": rms, "max_hu": max_hu, "per_scan": {}},
            "noise (MITS-GAN's RMS)": {"rms_hu": rms, "max_hu": 300, "per_scan": {}},
            "random signs": {"rms_hu": 10.0, "max_hu": 10, "per_scan": {}}}
    labels = {label for _, label in methods}
    return {"settings": dict(settings or SETTINGS), "methods": methods,
            "summary": {"table": {}, "perturbation": {k: v for k, v in pert.items() if k in labels},
                        "disruption": {a: {k: v for k, v in per.items() if k in labels}
                                       for a, per in disruption.items()}}}


def test_mean_and_range_of_each_figure_and_signs_ratio_per_run():
    # run 1: 20 / 10 = 2.0x signs; run 2: 30 / 30 = 1.0x. The ratio of the means (50 / 40)
    # would be 1.25: each run's ratio is taken first, against its own signs.
    agg = A.aggregate([_doc(20.0, 10.0, 30.0, unseen_mits=8.0), _doc(30.0, 30.0, 60.0, unseen_mits=12.0)])
    m = agg["methods"]["mitsgan"]
    assert agg["runs"] == 2 and agg["attackers"] == ["seen", "unseen"]
    assert m["label"] == "MITS-GAN (demo, unet)"
    assert m["rms_hu"] == {"mean": 45.0, "min": 30.0, "max": 60.0, "n": 2}
    assert m["seen"]["disruption"] == {"mean": 25.0, "min": 20.0, "max": 30.0, "n": 2}
    assert m["seen"]["inject"]["min"] == 15.0 and m["seen"]["remove"]["max"] == 35.0
    assert m["seen"]["x_signs"]["mean"] == pytest.approx(1.5)
    assert (m["seen"]["x_signs"]["min"], m["seen"]["x_signs"]["max"]) == pytest.approx((1.0, 2.0))
    # the unseen ratio uses the unseen signs of the same run (10 and 30)
    assert m["unseen"]["x_signs"]["mean"] == pytest.approx((8 / 10 + 12 / 30) / 2)
    assert agg["methods"]["signs"]["seen"]["x_signs"]["mean"] == pytest.approx(1.0)


def test_markdown_shows_mean_and_range_and_a_single_value_plainly():
    agg = A.aggregate([_doc(20.0, 10.0, 30.0), _doc(30.0, 30.0, 60.0)])
    text = A.markdown(agg, ["a.json", "b.json"])
    row = next(line for line in text.splitlines() if line.startswith("| MITS-GAN"))
    assert "45.00 [30.00, 60.00]" in row and "25.0 [20.0, 30.0]" in row and "1.50 [1.00, 2.00]" in row
    signs = next(line for line in text.splitlines() if line.startswith("| random signs"))
    assert "| 10.00 |" in signs            # equal in every run: no range
    assert "`a.json`" in text and "over 2 runs" in text


def test_methods_or_attackers_missing_in_one_run_are_left_out():
    two = [m for m in METHODS if m[0] != "noise"]
    agg = A.aggregate([_doc(20.0, 10.0, 30.0, unseen_mits=8.0), _doc(30.0, 30.0, 60.0, methods=two)])
    assert set(agg["methods"]) == {"mitsgan", "signs"}
    assert agg["attackers"] == ["seen"]


def test_other_locations_are_refused():
    other = dict(SETTINGS, seed=1)
    with pytest.raises(UsageError, match="seed"):
        A.check_same_evaluation([_doc(20.0, 10.0, 30.0), _doc(20.0, 10.0, 30.0, settings=other)],
                                ["a", "b"])


def test_cli_writes_both_files_and_refuses_bad_input_in_one_line(tmp_path, capfd):
    paths = []
    for i, (mits, signs) in enumerate([(20.0, 10.0), (30.0, 30.0), (25.0, 20.0)]):
        p = tmp_path / f"r{i}.json"
        p.write_text(json.dumps(_doc(mits, signs, 40.0 + i)))
        paths.append(p)
    res = call(A.main, [*paths, "--out", tmp_path / "agg"], capfd)
    assert res.rc == 0, res.err
    saved = json.loads((tmp_path / "agg" / "aggregate.json").read_text())
    assert saved["methods"]["mitsgan"]["seen"]["disruption"]["mean"] == pytest.approx(25.0)
    assert saved["sources"] == [str(p) for p in paths]
    assert (tmp_path / "agg" / "aggregate.md").read_text() == res.out

    (tmp_path / "bad.json").write_text("{not json")
    for argv, code in (([tmp_path / "missing.json"], 3), ([tmp_path / "bad.json"], 3),
                       ([paths[0], tmp_path / "x.json"], 3)):
        res = call(A.main, [*argv, "--out", tmp_path / "never"], capfd)
        assert res.rc == code and res.exc is None
        assert res.err.startswith("error: ") and len(res.err.strip().splitlines()) == 1
        assert not (tmp_path / "never").exists()
