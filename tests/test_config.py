import json

import pytest

import config as config_mod
from utils.errors import UsageError


@pytest.mark.parametrize("preset", sorted(config_mod.PRESETS))
def test_every_preset_is_valid_and_the_command_line_wins(preset):
    cfg = config_mod.parse_args(["--preset", preset])
    assert cfg.preset == preset
    for name, value in config_mod.PRESETS[preset].items():
        assert getattr(cfg, name) == value
    over = config_mod.parse_args(["--preset", preset, "--epochs", "3", "--slab", "2",
                                  "--save_img_result", "false"])
    assert (over.epochs, over.slab, over.save_img_result) == (3, 2, False)


def test_paper_is_the_default_and_shares_the_published_optimisation_with_reference():
    paper, ref = config_mod.parse_args([]), config_mod.make_config("reference")
    assert paper.preset == "paper"
    for name in ("epochs", "slab", "batch", "lr_g", "lr_d", "beta1", "beta2", "lambda_disrupt",
                 "generator", "discriminator", "g_width", "d_width", "attack_mode"):
        assert getattr(paper, name) == getattr(ref, name), name


def test_former_preset_name_still_works_with_one_notice(capsys):
    old = config_mod.parse_args(["--preset", "default"])
    err = capsys.readouterr().err
    assert old == config_mod.make_config("whitebox")
    assert err.count("\n") == 1 and "whitebox" in err


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
