"""One loader of CT-GAN model folders, and the attacker interface every attacker implements."""
import shutil

import numpy as np
import pytest
import torch

from procedures.attacker.interface import Attacker, Disruption
from procedures.attacker.model_dir import load_differentiable, load_norm, model_files
from utils.errors import ModelFileError


def _broken(root, tiny_models, drop):
    d = root / "INJ"
    shutil.copytree(tiny_models / "INJ", d)
    for name in drop:
        (d / name).unlink()
    return d


@pytest.mark.parametrize("drop,says", [
    (("G_model.h5",), "no generator file"),
    (("normalization.npy",), "normalization file not found"),
    (("equalization.npz",), "no equaliser"),
])
def test_every_attacker_refuses_a_broken_folder_with_the_same_words(
        tiny_ctgan_models, tmp_path, drop, says):
    from procedures.attacker.pipeline import CTGANModel
    from procedures.attacker.torch_attacker import load_tamper_core

    d = _broken(tmp_path, tiny_ctgan_models, drop)
    messages = set()
    for load in (lambda: CTGANModel(d), lambda: load_tamper_core(d, "inject", "cpu"),
                 lambda: load_differentiable(d, None)):
        with pytest.raises(ModelFileError, match=says) as e:
            load()
        messages.add(str(e.value))
    assert len(messages) == 1
    assert model_files(d, missing_ok=True) is None


def test_missing_folder_and_bad_normalisation(tmp_path):
    with pytest.raises(ModelFileError, match="model folder not found"):
        model_files(tmp_path / "nope")
    bad = tmp_path / "n.npy"
    np.save(bad, np.array([0.0, 1.0, 1.0]))   # max == min: nothing to normalise by
    with pytest.raises(ModelFileError, match=r"\[mean, min, max\]"):
        load_norm(bad)
    np.save(bad, np.array([0.5, -1.0, 2.0], np.float32))
    assert load_norm(bad).dtype == np.float64


def test_published_generator_name_is_found(tiny_ctgan_models, tmp_path):
    d = tmp_path / "INJ"
    shutil.copytree(tiny_ctgan_models / "INJ", d)
    (d / "G_model.h5").rename(d / "G_model_inj.h5")
    assert model_files(d).generator.name == "G_model_inj.h5"
    assert load_differentiable(d, None).generators["inject"] is not None


def test_every_attacker_implements_the_interface(tiny_ctgan_models):
    from procedures.attacker.pipeline import ScanManipulator
    from procedures.attacker.torch_attacker import TorchScanManipulator
    from procedures.protection.disruption import DisruptionTarget
    from procedures.protection.whitebox import WhiteboxDisruption
    import config

    dt = load_differentiable(tiny_ctgan_models / "INJ", tiny_ctgan_models / "REM")
    keras_one, torch_one = ScanManipulator(tiny_ctgan_models), TorchScanManipulator(tiny_ctgan_models)
    for attacker in (keras_one, torch_one, dt):
        assert isinstance(attacker, Attacker)
    cfg = config.make_config("demo", models_dir=str(tiny_ctgan_models))
    assert isinstance(DisruptionTarget(cfg), Disruption)
    assert isinstance(WhiteboxDisruption(cfg, torch.device("cpu")), Disruption)


def test_the_port_tampers_in_place_like_its_forward(tiny_ctgan_models):
    from utils.phantom import phantom

    dt = load_differentiable(tiny_ctgan_models / "INJ", tiny_ctgan_models / "REM")
    vol = phantom((40, 64, 64)).astype(np.float32)
    want = dt(torch.from_numpy(vol), (1.0, 1.0, 1.0), (20, 32, 46), "inject").detach().numpy()
    changed = dt.tamper_volume(vol, (1.0, 1.0, 1.0), (20, 32, 46), "inject")
    np.testing.assert_array_equal(vol, want)
    outside = np.ones(vol.shape, bool)
    outside[changed] = False
    assert np.array_equal(vol[outside], phantom((40, 64, 64)).astype(np.float32)[outside])
