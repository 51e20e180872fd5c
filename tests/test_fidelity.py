"""Golden tests of the `reference` preset against facts about the published code
(docs/fidelity.md), on geometries where the published and our behaviour differ. Each test
fails if the published behaviour is replaced by ours."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from config import make_config
from conftest import make_phantom
from utils.scan_io import Scan, load_scan, save_mhd

Z25 = "data/z2.5"


@pytest.fixture(scope="module")
def models(tiny_ctgan_models):
    """The tiny CT-GAN models, loaded and traced once for this module (CTGANModel.shared
    reuses a model while something holds it)."""
    from procedures.attacker.pipeline import ScanManipulator

    keep = [ScanManipulator(tiny_ctgan_models, missing_model=m) for m in ("error", "unchanged")]
    for k in keep:
        k.injector, k.remover
    yield tiny_ctgan_models


def _target(cfg, attacker=None):
    from procedures.protection.disruption import DisruptionTarget
    return DisruptionTarget(cfg, attacker=attacker)


def _items(folder, mhd_only=True):
    from scanDataset import ScanDataset
    ds = ScanDataset(folder, dtype=torch.float64, mhd_only=mhd_only)
    return [ds[i] for i in range(len(ds))]


def _empty_models(root):
    for sub in ("INJ", "REM"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


# --- published behaviours are config fields, not the preset's name ---------------------------
def test_published_behaviours_are_fields_that_any_preset_can_take(tmp_path):
    from discriminator import build_discriminator

    models = _empty_models(tmp_path / "m")
    cfg = make_config("paper", models_dir=str(models), attack_borders="published",
                      missing_model="unchanged", d_bias=False, d_sigmoid=True)
    man = _target(cfg).attacker
    assert (man.borders, man.missing_model) == ("published", "unchanged")
    d = build_discriminator(cfg, 512)
    assert d.sigmoid_head and not any(m.bias is not None for m in d.modules() if isinstance(m, torch.nn.Conv2d))
    ref = _target(make_config("reference", models_dir=str(models))).attacker
    assert (ref.borders, ref.missing_model, ref.exact_resample) == ("published", "unchanged", False)


def test_reference_discriminator_has_eight_convolutions_without_bias():
    from discriminator import build_discriminator

    convs = [m for m in build_discriminator(make_config("reference"), 512).modules()
             if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and all(c.bias is None for c in convs)
    assert [c.out_channels for c in convs] == [1, 2, 4, 8, 8, 8, 8, 1]


# --- near-end rule: 7 of 23 and 14 of 30 sub-batches at 2.5 mm, none at 5 mm ---------------
@pytest.mark.realdata
def test_near_end_rule_counts_on_the_real_scans(real_data_dir):
    import SimpleITK as sitk
    from procedures.protection.disruption import Locator

    def counts(folder):
        out = []
        for name in ("lung1.mhd", "lung2.mhd"):
            r = sitk.ImageFileReader()
            r.SetFileName(str(folder / name))
            r.ReadImageInformation()
            depth = r.GetSize()[2]
            loc = Locator(make_config("reference"))
            out.append((sum(loc.eligible(4 * j, depth) for j in range(depth // 4)), depth // 4))
        return out

    assert counts(real_data_dir.parent / "z2.5") == [(7, 23), (14, 30)]
    assert counts(real_data_dir) == [(0, 12), (0, 15)]


# --- 5 mm: the published zoom gives a 30 mm cube and the reshape to 32^3 fails -------------
def test_published_zoom_of_a_5mm_cut_gives_30_slices():
    from utils.resample import scale_published, scaled_shape

    cut = scaled_shape((32, 32, 32), 1 / np.array([5.0, 0.7, 0.7]))
    assert cut.tolist() == [6, 46, 46]
    assert scale_published(np.zeros(tuple(cut)), (5.0, 0.7, 0.7)).shape == (30, 32, 32)


@pytest.mark.tf
@pytest.mark.realdata
def test_reference_attack_cannot_tamper_a_5mm_scan(models, real_data_dir):
    from procedures.attacker.pipeline import AttackShapeError

    scan = load_scan(real_data_dir / "lung1.mhd")        # 5 mm slices
    man = _target(make_config("reference", models_dir=str(models))).attacker
    vol = scan.hu.astype(np.float64)
    with pytest.raises(AttackShapeError, match=r"=30 != 32"):
        man.tamper_volume(vol, scan.spacing, (33, 359, 218), "inject")


# --- border cubes: the published paste grows the scan ---------------------------------------
def test_published_paste_shape_on_the_real_geometries():
    from procedures.attacker.pipeline import published_paste_shape
    from utils.resample import scaled_shape

    # lung1 at 2.5 x 0.570 mm: cube (13, 56, 56); lung2 at 2.5 x 0.627 mm: cube (13, 51, 51).
    c1 = scaled_shape((32, 32, 32), 1 / np.array([2.5, 0.570, 0.570]))
    c2 = scaled_shape((32, 32, 32), 1 / np.array([2.5, 0.627, 0.627]))
    assert c1.tolist() == [13, 56, 56] and c2.tolist() == [13, 51, 51]
    assert published_paste_shape((95, 512, 512), (68, 300, 300), c1) == (181, 512, 512)   # s = 60
    assert published_paste_shape((95, 512, 512), (64, 300, 300), c1) == (95, 512, 512)    # s = 56
    assert published_paste_shape((121, 512, 512), (96, 90, 410), c2) == (197, 512, 512)   # s = 88
    assert published_paste_shape((121, 512, 512), (92, 90, 410), c2) == (121, 512, 512)   # s = 84
    assert published_paste_shape((95, 512, 512), (68, 300, 300), (40, 40, 40)) == (95, 512, 512)


def _border_phantom():
    # 2.5 x 0.7 x 0.7 mm: cube (13, 46, 46), reference cube side int(46 * 1.3) = 59.
    return make_phantom((70, 128, 128), seed=3).astype(np.float64)


@pytest.mark.tf
def test_border_cube_grows_the_scan_and_copies_noise_from_the_grown_scan(models):
    from procedures.attacker.pipeline import ScanManipulator

    spacing, coord = (2.5, 0.7, 0.7), (50, 64, 64)
    pub = ScanManipulator(models, exact_resample=False, borders="published")
    vol = _border_phantom()
    pub.tamper_volume(vol, spacing, coord, "inject")
    # z + round(46 / 2) + 1 > 70: the paste takes its padding branch; 70 + 2 * (46 - 13) slices.
    assert pub.last_scan_shape == (136, 128, 128)
    # The same tamper on the scan explicitly grown with 66 slices of 0 HU: identical first 70
    # slices (its copy-noise block sits at slice 68 of the grown scan, not at 35).
    grown = np.zeros((136, 128, 128))
    grown[:70] = _border_phantom()
    ScanManipulator(models, exact_resample=False).tamper_volume(grown, spacing, coord, "inject")
    np.testing.assert_array_equal(vol, grown[:70])
    assert (vol != _border_phantom()).any()


@pytest.mark.tf
def test_border_cube_fails_where_a_touch_up_cut_needs_padding(models):
    from procedures.attacker.pipeline import AttackBorderError, ScanManipulator

    pub = ScanManipulator(models, exact_resample=False, borders="published")
    vol = _border_phantom()
    # z = 42: no growth (42 + 24 <= 70) but the reference cube needs 42 + 31 > 70 slices.
    with pytest.raises(AttackBorderError, match="reference cube of side 59"):
        pub.tamper_volume(vol, (2.5, 0.7, 0.7), (42, 64, 64), "inject")
    np.testing.assert_array_equal(vol, _border_phantom())


@pytest.mark.tf
@pytest.mark.realdata
def test_reference_preset_forms_T_on_17_of_21_eligible_sub_batches(models, real_data_dir):
    # reread_scan off: the counts do not depend on it and the re-read costs ~0.4 s per step.
    cfg = make_config("reference", data_dir=str(real_data_dir.parent / "z2.5"),
                      models_dir=str(models), reread_scan=False)
    t = _target(cfg)
    rng = np.random.default_rng(0)
    outcome, grown = {}, {}
    for item in _items(cfg.data_dir):
        depth = item.volume.shape[0]
        for j in range(depth // 4):
            s = 4 * j
            if not t.locator.eligible(s, depth):
                continue
            T = t.target(item, s, item.volume[s:s + 4].numpy(), j, rng)
            outcome[(item.path.split("/")[-1], s)] = T is not None
            if t.attacker.last_scan_shape and t.attacker.last_scan_shape[0] != depth:
                grown[(item.path.split("/")[-1], s)] = (depth, t.attacker.last_scan_shape[0])
    failed = sorted(k for k, ok in outcome.items() if not ok)
    assert len(outcome) == 21 and sum(outcome.values()) == 17
    assert failed == [("lung1.mhd", 52), ("lung1.mhd", 56), ("lung2.mhd", 80), ("lung2.mhd", 84)]
    assert grown == {("lung1.mhd", 60): (95, 181), ("lung2.mhd", 88): (121, 197)}
    assert dict(t.stats.errors) == {"AttackBorderError": 4}


# --- forming T: one joint min-max each way; NaN for a constant slab; silent failed re-read ----
def _write_scan(tmp_path, depth=72):
    d = tmp_path / "scans"
    d.mkdir()
    save_mhd(Scan(make_phantom((depth, 128, 128), seed=5), (2.5, 1.0, 1.0), (0.0, 0.0, 0.0)), d / "a.mhd")
    return d


class _Recorder:
    """Wraps a real manipulator and keeps a copy of the slab it was given."""

    def __init__(self, man, slab):
        self.man, self.slab, self.seen = man, slab, None

    def model(self, action):
        return self.man.model(action)

    def tamper_volume(self, vol, *a, **kw):
        self.seen = vol[self.slab].copy()
        return self.man.tamper_volume(vol, *a, **kw)


@pytest.mark.tf
def test_T_uses_one_joint_min_max_each_way(tmp_path, models):
    from procedures.attacker.pipeline import ScanManipulator

    cfg = make_config("reference", data_dir=str(_write_scan(tmp_path)), models_dir=str(models))
    item = _items(cfg.data_dir)[0]
    s = 36
    x_p = np.stack([np.full((128, 128), v) for v in (-0.8, -0.2, 0.1, 0.6)])
    x_p += np.linspace(0, 0.1, 128)[None, None, :]
    rec = _Recorder(ScanManipulator(models, published=True), slice(s, s + 4))
    T = _target(cfg, rec).target(item, s, x_p, 0, np.random.default_rng(1))
    orig = item.scan.hu[s:s + 4].astype(np.float64)
    # The 4 protected slices mapped together onto [min, max] of the 4 original slices.
    expect = (x_p - x_p.min()) / (x_p.max() - x_p.min()) * (orig.max() - orig.min()) + orig.min()
    np.testing.assert_allclose(rec.seen, expect, rtol=0, atol=1e-9)
    assert rec.seen[3].min() > orig.min() + 100          # not per slice
    # T: one min-max of the 4 tampered slices to [-1, 1] (so only the extreme slices reach +-1).
    assert T.shape == x_p.shape and T.min() == -1.0 and T.max() == 1.0
    assert min(T[k].min() for k in range(4)) == -1.0 and sum(T[k].min() == -1.0 for k in range(4)) < 4


@pytest.mark.tf
def test_constant_protected_slab_gives_the_published_nan(tmp_path, models):
    data = _write_scan(tmp_path)
    x_p = np.full((4, 128, 128), 0.25)
    cfg = make_config("reference", data_dir=str(data), models_dir=str(models))
    item = _items(data)[0]
    T = _target(cfg).target(item, 36, x_p, 0, np.random.default_rng(0))
    assert T is not None and np.isnan(T).all()
    ours = _target(make_config("reference", data_dir=str(data), models_dir=str(models),
                               span_guard=True)).target(item, 36, x_p, 0, np.random.default_rng(0))
    assert np.isfinite(ours).all()


def test_failed_reread_gives_a_silent_zero_term(tmp_path, caplog):
    data = _write_scan(tmp_path)
    cfg = make_config("reference", data_dir=str(data), models_dir=str(_empty_models(tmp_path / "m")))
    item = _items(data)[0]
    (data / "a.raw").unlink()            # the per-step re-read now fails
    t = _target(cfg)
    with caplog.at_level("WARNING", logger="mitsgan.disruption"):
        assert t.target(item, 36, item.volume[36:40].numpy(), 0, np.random.default_rng(0)) is None
    assert sum(t.stats.errors.values()) == 1 and t.stats.computed == 0
    assert not caplog.records            # silent, as published (still counted)


# --- CT-GAN training samples: 67 augmentations, integer HU, the published zoom ----------------
def test_reference_training_samples_at_3mm():
    from procedures.ctgan import dataset as ds
    from procedures.ctgan.train import make_config as ctgan_config

    cfg = ctgan_config("reference")
    hu = make_phantom((40, 96, 96), seed=2)
    spacing = (3.0, 1.0, 1.0)
    x0 = ds.extract_cube(hu, spacing, (20, 48, 48), cfg.exact_resample, cfg.integer_hu)
    assert x0.shape == (39, 40, 40) and x0.dtype == np.int16     # round(40/3) = 13 slices -> 39
    samples = ds.location_samples(hu, spacing, (20, 48, 48), cfg.exact_resample, cfg.integer_hu)
    assert samples.shape == (67, 32, 32, 32)
    np.testing.assert_array_equal(samples, np.round(samples))   # integer HU, as published
    padded = ds.location_samples(hu, spacing, (3, 48, 48), cfg.exact_resample, cfg.integer_hu)
    assert not np.array_equal(padded, np.round(padded))         # a padded cut is float
