import json

import pytest

import config as config_mod
from utils.errors import UsageError


def test_presets_and_overrides():
    ref = config_mod.parse_args(["--preset", "reference"])
    assert (ref.dtype, ref.epochs, ref.slab, ref.lr_g, ref.lr_d) == ("float64", 5, 4, 2e-4, 2e-4)
    assert (ref.beta1, ref.beta2, ref.lambda_disrupt) == (0.5, 0.999, 0.1)
    assert ref.reread_scan and not ref.exact_resample and ref.attack_errors == "silent"
    demo = config_mod.parse_args(["--preset", "demo", "--epochs", "3", "--save_img_result", "false"])
    assert demo.epochs == 3 and demo.save_img_result is False and demo.generator == "unet"
    assert config_mod.parse_args([]).preset == "paper"


@pytest.mark.parametrize("argv", [["--no_such_flag", "1"], ["--epochs", "x"], ["--preset", "nope"],
                                  ["--generator", "gan"], ["--save_img_result", "maybe"],
                                  ["--eps_hu", "5"]])
def test_bad_flags_are_one_line_usage_errors(argv):
    with pytest.raises(UsageError) as e:
        config_mod.parse_args(argv)
    assert "\n" not in str(e.value)


def test_config_round_trips_through_json(tmp_path):
    cfg = config_mod.make_config("demo", epochs=7)
    cfg.save(tmp_path / "c.json")
    back = config_mod.load_config_dict(json.loads((tmp_path / "c.json").read_text()))
    assert back == cfg


def test_ckpt_every_zero_means_only_at_the_end_and_negative_is_refused():
    # Saved configs with ckpt_every 0 (checkpoint only at the end) must keep loading.
    from dataclasses import asdict

    from config import load_config_dict, make_config
    cfg = make_config("demo", ckpt_every=0)
    assert load_config_dict(asdict(cfg)).ckpt_every == 0
    with pytest.raises(UsageError):
        make_config("demo", ckpt_every=-1)
