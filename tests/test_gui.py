"""GUI.py headless (Agg): its callbacks are called directly with synthetic events."""
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import GUI  # noqa: E402
from conftest import make_phantom  # noqa: E402
from procedures.attacker.pipeline import ScanManipulator  # noqa: E402
from utils.scan_io import Scan, load_scan, save_mhd  # noqa: E402

pytestmark = pytest.mark.tf
SPACING = (2.5, 0.7, 0.7)


@pytest.fixture
def viewer(tmp_path, tiny_ctgan_models):
    src = tmp_path / "in" / "chest.mhd"
    src.parent.mkdir()
    save_mhd(Scan(make_phantom((20, 48, 48), seed=2), SPACING, (1.0, 2.0, 3.0)), src)
    scan = load_scan(src)
    protected = scan.hu.astype(np.int16) + 7
    v = GUI.Viewer(scan, ScanManipulator(tiny_ctgan_models), tmp_path / "saved", protected)
    v.build()
    yield v
    import matplotlib.pyplot as plt
    plt.close(v.fig)


def click(v, y, x, ax=None, button=1):
    v.on_click(SimpleNamespace(inaxes=v.ax if ax is None else ax, button=button, xdata=float(x), ydata=float(y)))


def test_click_tampers_only_inside_the_footprint(viewer):
    v = viewer
    before = v.current.copy()
    v.set_slice(10)
    click(v, 24.2, 33.8)                                     # rounds to voxel (10, 24, 34)
    assert v.history["original"] == [(10, 24, 34, "inject")]
    fp = v.manip.footprint(before.shape, SPACING, (10, 24, 34))
    changed = v.current != before
    assert changed[fp].any()
    outside = changed.copy()
    outside[fp] = False
    assert not outside.any()
    # The protected volume is untouched by a tamper of the original.
    np.testing.assert_array_equal(v.volumes["protected"], before + 7)
    # Clicks outside the image, or with another button, do nothing.
    snapshot = v.current.copy()
    click(v, 24, 34, ax=object())
    click(v, 24, 34, button=3)
    np.testing.assert_array_equal(v.current, snapshot)


def test_scroll_and_keys_change_the_slice(viewer):
    v = viewer
    assert v.z == 10
    v.on_scroll(SimpleNamespace(button="up", step=1))
    assert v.z == 11
    v.on_scroll(SimpleNamespace(button="down", step=-1))
    v.on_key(SimpleNamespace(key="down"))
    assert v.z == 9
    np.testing.assert_array_equal(v.image.get_array(), v.current[9])
    v.on_key(SimpleNamespace(key="pageup"))
    v.on_key(SimpleNamespace(key="pageup"))
    assert v.z == 19                                          # clipped at the last slice


def test_toggles_volume_and_action(viewer, tmp_path):
    v = viewer
    v.on_key(SimpleNamespace(key="t"))
    assert v.showing == "protected"
    np.testing.assert_array_equal(v.image.get_array(), v.volumes["protected"][v.z])
    v.on_key(SimpleNamespace(key="a"))
    assert v.action == "remove"
    click(v, 20, 14)
    assert v.history == {"original": [], "protected": [(10, 20, 14, "remove")]}
    v.button._observers.process("clicked", None)             # the on-screen button
    assert v.action == "inject"
    v.on_key(SimpleNamespace(key="t"))
    assert v.showing == "original"
    # A viewer without a protected scan stays on the original and says why.
    single = GUI.Viewer(v.scan, v.manip, tmp_path / "x")
    single.toggle_volume()
    assert single.showing == "original" and "no protected scan" in single.status


def test_save_writes_a_readable_tampered_scan_not_the_input(viewer):
    v = viewer
    src = v.scan.source_path
    raw_before = open(src.replace(".mhd", ".raw"), "rb").read()
    click(v, 24, 34)
    first = v.save()
    back = load_scan(first)
    assert back.hu.dtype == np.int16
    np.testing.assert_array_equal(back.hu, np.rint(v.current).astype(np.int16))
    np.testing.assert_array_equal(back.spacing, v.scan.spacing)
    np.testing.assert_array_equal(back.origin, v.scan.origin)
    assert first.name == "chest_original_tampered_001.mhd"
    v.on_key(SimpleNamespace(key="t"))
    v.on_key(SimpleNamespace(key="s"))
    assert v.saved[-1].name == "chest_protected_tampered_001.mhd"
    v.on_key(SimpleNamespace(key="t"))
    assert v.save().name == "chest_original_tampered_002.mhd"   # never overwrites a save
    assert open(src.replace(".mhd", ".raw"), "rb").read() == raw_before


def test_main_with_a_checkpoint_runs_headless(tmp_path, tiny_ctgan_models, monkeypatch):
    from helpers import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ck")
    shown = []
    monkeypatch.setattr("matplotlib.pyplot.show", lambda *a, **k: shown.append(True))
    scan = tmp_path / "ck" / "scans" / "vol0.mhd"
    assert GUI.main(["--scan", str(scan), "--checkpoint", str(ckpt), "--models", str(tiny_ctgan_models),
                     "--out", str(tmp_path / "o")]) == 0
    assert shown == [True]


def test_key_shows_the_seal_and_the_tamper_it_flags(tmp_path, tiny_ctgan_models):
    """GUI.py --key: a sealed scan is 'intact'; a click tampers it and the flagged region, in
    red under the click, and 'tampered (1 regions)' appear."""
    from procedures.protection.seal import seal_volume

    key = bytes(range(32))
    src = tmp_path / "chest.mhd"
    # 128 x 128: CT-GAN's touch-ups reach +-36 voxels, a smaller slice would change everywhere
    sealed = seal_volume(make_phantom((30, 128, 128), seed=2), key)
    save_mhd(Scan(sealed, SPACING, (1.0, 2.0, 3.0)), src)
    v = GUI.Viewer(load_scan(src), ScanManipulator(tiny_ctgan_models), tmp_path / "saved", key=key)
    v.build()
    v.set_slice(15)
    assert v.ax.get_title().endswith("— intact")
    assert not v.overlay.get_array()[..., 3].any()
    click(v, 64, 40)
    assert "tampered (1 regions)" in v.ax.get_title()
    assert v.overlay.get_array()[64, 40, 3] > 0                    # the click's block is red
    changed = np.round(v.current) != sealed
    assert np.array_equal(v.seal["original"][1] > 0, _blocks_of(changed))
    unsealed = GUI.Viewer(load_scan(src), v.manip, tmp_path / "saved", key=bytes(32))
    unsealed.build()
    assert "sealed with another key" in unsealed.ax.get_title()
    import matplotlib.pyplot as plt
    plt.close("all")


def _blocks_of(changed: np.ndarray) -> np.ndarray:
    """Voxel mask of the 8 x 8 blocks holding a changed voxel."""
    nz, ny, nx = changed.shape
    b = changed.reshape(nz, ny // 8, 8, nx // 8, 8).any(axis=(2, 4))
    return np.repeat(np.repeat(b, 8, axis=1), 8, axis=2)
