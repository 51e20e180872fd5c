"""Interactive CT-GAN tampering viewer (like CT-GAN's GUI.py), with MITS-GAN protection.

    python GUI.py --scan data/z2.5/lung1.mhd --models models [--protected P | --checkpoint C]

Mouse wheel or up/down keys: change slice (page up/down: 10 slices).
Left click: inject or remove at that point with the CT-GAN models (in the volume shown).
a (or the button): toggle inject/remove.       t: toggle original / protected scan.
s: save the shown volume, tampered, into --out (never over the input).   q: quit.
The protected scan is --protected (a scan of the same shape) or made on start from a MITS-GAN
--checkpoint. Tampering works on float32 copies; the files on disk are never modified.
--key KEYFILE: the shown scan's seal is verified (docs/seal.md) on start and after every tamper,
as the scan would be stored: failing blocks in red, "intact" / "tampered (N regions)" in the title.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from utils.atomic import check_output_dir, ensure_not_input, os_error_message
from utils.cli import cli_main
from utils.errors import CliParser, MitsError, OutputError, ScanFormatError, UsageError, run_cli
from utils.scan_io import load_scan, save_dicom_series, save_mhd

KEYS = ("up", "down", "pageup", "pagedown", "a", "t", "s", "q")


class Viewer:
    """Holds the volumes and the figure; every callback can be called directly (tests)."""

    def __init__(self, scan, manipulator, out_dir, protected_hu: np.ndarray | None = None,
                 window=(-1000.0, 400.0), fmt: str = "mhd", key: bytes | None = None):
        self.scan = scan
        self.key = key
        self.seal: dict[str, tuple[str, np.ndarray | None]] = {}  # volume -> (verdict, voxel map)
        self.manip = manipulator
        self.out_dir = Path(out_dir)
        self.window = window
        self.fmt = fmt
        self.volumes = {"original": scan.hu.astype(np.float32)}
        if protected_hu is not None:
            if protected_hu.shape != scan.hu.shape:
                raise ScanFormatError(f"protected scan has shape {protected_hu.shape}, "
                                      f"the scan {scan.hu.shape}")
            self.volumes["protected"] = np.asarray(protected_hu, dtype=np.float32).copy()
        self.showing = "original"
        self.action = "inject"
        self.z = scan.hu.shape[0] // 2
        self.history: dict[str, list] = {k: [] for k in self.volumes}
        self.saved: list[Path] = []
        self.status = ""
        self.fig = self.ax = self.image = self.button = None
        self.rng = np.random.default_rng(0)

    # --- figure ---------------------------------------------------------------------------------
    def build(self, fig=None):
        import matplotlib.pyplot as plt  # lazy: matplotlib only when the viewer opens (fast --help)
        from matplotlib.widgets import Button

        for name, keys in plt.rcParams.items():  # our keys must not also trigger matplotlib's
            if name.startswith("keymap.") and isinstance(keys, list):
                plt.rcParams[name] = [k for k in keys if k not in KEYS]
        self.fig = fig or plt.figure(figsize=(8, 8.6))
        self.ax = self.fig.add_axes([0.05, 0.1, 0.9, 0.82])
        self.ax.set_xticks([]); self.ax.set_yticks([])
        self.image = self.ax.imshow(self.current[self.z], cmap="gray", vmin=self.window[0],
                                    vmax=self.window[1], interpolation="nearest")
        self.marks = self.ax.plot([], [], "r+", ms=12, mew=1.5)[0]
        self.overlay = self.ax.imshow(np.zeros(self.current.shape[1:] + (4,), np.float32),
                                      interpolation="nearest")
        bax = self.fig.add_axes([0.05, 0.02, 0.25, 0.05])
        self.button = Button(bax, "")
        self.button.on_clicked(lambda _e: self.toggle_action())
        self.text = self.fig.text(0.33, 0.035, "", fontsize=9, va="center")
        c = self.fig.canvas
        c.mpl_connect("scroll_event", self.on_scroll)
        c.mpl_connect("key_press_event", self.on_key)
        c.mpl_connect("button_press_event", self.on_click)
        self.redraw()
        return self.fig

    @property
    def current(self) -> np.ndarray:
        return self.volumes[self.showing]

    def redraw(self) -> None:
        if self.fig is None:
            return
        self.image.set_data(self.current[self.z])
        verdict = self._seal_overlay()
        pts = [(x, y) for (z, y, x, _a) in self.history[self.showing] if z == self.z]
        self.marks.set_data([p[0] for p in pts], [p[1] for p in pts])
        n = len(self.history[self.showing])
        self.ax.set_title(f"{Path(self.scan.source_path or 'scan').name} — {self.showing}"
                          f"{' (' + str(n) + ' tampers)' if n else ''} — slice {self.z + 1}/"
                          f"{self.current.shape[0]}{verdict}", fontsize=10)
        self.button.label.set_text(f"click = {self.action.upper()} (a)")
        others = "t: original/protected, " if len(self.volumes) > 1 else ""
        self.text.set_text(f"{self.status}\nwheel/up/down: slice, {others}s: save, q: quit")
        self.fig.canvas.draw_idle()

    def check_seal(self) -> tuple[str, np.ndarray | None]:
        """The shown volume's seal as it would be stored (rounded to int16): the verdict and
        the voxel tamper map (None without a seal)."""
        from procedures.protection.seal import verify_volume  # lazy: only with --key
        from procedures.protection.seal_report import tamper_regions, voxel_map
        from utils.errors import BlockSizeError, NoSealError, WrongKeyError
        from utils.stored import stored_as

        hu = stored_as(self.current, np.int16)
        try:
            v = verify_volume(hu, self.key)
        except NoSealError:
            return "no seal", None
        except (WrongKeyError, BlockSizeError):
            return "sealed with another key (or all changed)", None
        n = len(tamper_regions(v, self.scan))
        verdict = "intact" if v.intact else (f"tampered ({n} regions)" if n else "tampered (shape)")
        return verdict, voxel_map(v)

    def _seal_overlay(self) -> str:
        """Update the red overlay of failing blocks; the title's seal verdict ('' without --key)."""
        if self.key is None:
            return ""
        if self.showing not in self.seal:
            self.seal[self.showing] = self.check_seal()
        verdict, vmap = self.seal[self.showing]
        rgba = np.zeros(self.current.shape[1:] + (4,), np.float32)
        if vmap is not None:
            rgba[vmap[self.z] > 0] = (1.0, 0.1, 0.1, 0.4)
        self.overlay.set_data(rgba)
        return f" — {verdict}"

    # --- callbacks ------------------------------------------------------------------------------
    def set_slice(self, z: int) -> None:
        self.z = int(np.clip(z, 0, self.current.shape[0] - 1))
        self.redraw()

    def on_scroll(self, event) -> None:
        step = getattr(event, "step", 0) or (1 if event.button == "up" else -1)
        self.set_slice(self.z + (1 if step > 0 else -1))

    def on_key(self, event) -> None:
        k = event.key
        if k in ("up", "down"):
            self.set_slice(self.z + (1 if k == "up" else -1))
        elif k in ("pageup", "pagedown"):
            self.set_slice(self.z + (10 if k == "pageup" else -10))
        elif k == "a":
            self.toggle_action()
        elif k == "t":
            self.toggle_volume()
        elif k == "s":
            self._guarded(self.save)
        elif k == "q" and self.fig is not None:
            import matplotlib.pyplot as plt  # lazy: as in build
            plt.close(self.fig)

    def on_click(self, event) -> None:
        if event.inaxes is not self.ax or event.button != 1 or event.xdata is None:
            return
        toolbar = getattr(self.fig.canvas, "toolbar", None) if self.fig is not None else None
        if toolbar is not None and getattr(toolbar, "mode", ""):  # zooming/panning, not tampering
            return
        self._guarded(self.tamper, int(round(event.ydata)), int(round(event.xdata)))

    def _guarded(self, action, *args):
        """Run a user action from an event: a MitsError (full disk, read-only folder, a tamper
        the attack cannot do) becomes one 'error:' line and the status text, not a traceback in
        the event loop; the viewer keeps running."""
        try:
            return action(*args)
        except MitsError as e:
            self.status = f"error: {e}"
            print(self.status, file=sys.stderr, flush=True)
            self.redraw()
            return None

    def toggle_action(self) -> None:
        self.action = "remove" if self.action == "inject" else "inject"
        self.status = f"clicks now {self.action}"
        self.redraw()

    def toggle_volume(self) -> None:
        names = list(self.volumes)
        if len(names) == 1:
            self.status = "no protected scan loaded (--protected or --checkpoint)"
        else:
            self.showing = names[(names.index(self.showing) + 1) % len(names)]
            self.status = f"showing the {self.showing} scan"
        self.redraw()

    def tamper(self, y: int, x: int) -> tuple:
        """Tamper the shown volume at (current slice, y, x); returns the changed slices."""
        from utils.scan import check_coord

        coord = (self.z, y, x)
        check_coord(coord, self.current.shape)
        t0 = time.perf_counter()
        changed = self.manip.tamper_volume(
            self.current, self.scan.spacing, coord, self.action, self.rng
        )
        self.seal.pop(self.showing, None)  # verified again on the next redraw
        self.history[self.showing].append((*coord, self.action))
        self.status = (f"{self.action} at (z,y,x)=({self.z},{y},{x}) on the {self.showing} scan: "
                       f"{time.perf_counter() - t0:.2f} s")
        print(self.status, flush=True)
        self.redraw()
        return changed

    def save(self) -> Path:
        """Write the shown volume (with its tampers) into out_dir, as the source's dtype."""
        from procedures.protection.apply import scan_with_hu  # lazy: it pulls torch (fast --help)
        from utils.scan_paths import scan_stem

        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(os_error_message(self.out_dir, e)) from None
        stem = f"{scan_stem(self.scan.source_path or 'scan')}_{self.showing}_tampered"
        k = 1
        while any(self.out_dir.glob(f"{stem}_{k:03d}*")):
            k += 1
        # scan_with_hu: source geometry/metadata, int16 when the source is; source_path set so
        # the writers refuse to overwrite the input.
        out = dataclasses.replace(
            scan_with_hu(self.scan, self.current), source_path=self.scan.source_path
        )
        if self.fmt == "dicom":
            path = save_dicom_series(out, self.out_dir / f"{stem}_{k:03d}",
                                     series_description=f"CT-GAN tampered ({self.showing})")
        else:
            path = save_mhd(out, self.out_dir / f"{stem}_{k:03d}.mhd")
        self.saved.append(path)
        self.status = f"saved {path}"
        print(self.status, flush=True)
        self.redraw()
        return path



def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scan", required=True, help="scan to view: .mhd/.nrrd file or DICOM series folder"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--protected", help="its protected version (same shape)")
    g.add_argument("--checkpoint", help="MITS-GAN checkpoint: protect the scan on start")
    p.add_argument("--models", default="models", help="CT-GAN models folder with INJ/ and REM/")
    p.add_argument("--out", default="tampered", help="folder for saved scans (default tampered/)")
    p.add_argument(
        "--format", choices=["mhd", "dicom"], default="mhd", help="format of saved scans"
    )
    p.add_argument("--device", default="auto", help="device for --checkpoint")
    p.add_argument("--backend", choices=["tensorflow", "torch"], default=None, help="Keras backend")
    p.add_argument("--window", default="-1000,400", help="display window in HU (default -1000,400)")
    p.add_argument("--key", default="",
                   help="seal key: show the seal's verdict and tamper map (docs/seal.md)")
    return p


@cli_main(build_parser)
def main(args) -> int:
    try:
        window = tuple(float(v) for v in args.window.split(","))
        assert len(window) == 2 and window[1] > window[0]
    except (ValueError, AssertionError):
        raise UsageError(f"--window must be LOW,HIGH in HU, got {args.window!r}") from None
    from procedures.attacker.pipeline import ScanManipulator, check_cube_fits  # lazy: SciPy/torch
    from utils.keyfile import read_key

    key = read_key(args.key) if args.key else None
    scan = load_scan(args.scan)
    ensure_not_input(args.out, [args.scan])
    check_output_dir(args.out)  # saving must be possible before the user tampers
    protected = G = None
    if args.protected:
        protected = load_scan(args.protected).hu
    elif args.checkpoint:
        from procedures.protection.apply import check_generator_fits, load_generator, protect_hu
        from utils.device import pick_device

        device = pick_device(args.device)
        G, cfg, dtype = load_generator(args.checkpoint, device)
        check_generator_fits(G, cfg.slab, scan.hu, args.scan)
    check_cube_fits(scan.shape, scan.spacing, args.scan)  # the viewer is for CT-GAN's tamper
    if G is not None:
        print(f"protecting {args.scan} with {args.checkpoint} ...", flush=True)
        # As a stored protected scan would be: int16 when the source is.
        hu = scan.hu
        out = np.empty(hu.shape, hu.dtype if np.issubdtype(hu.dtype, np.integer) else np.float32)
        protected = protect_hu(G, hu, cfg, device, dtype=dtype, out=out)
    manip = ScanManipulator(args.models, backend=args.backend)
    print("loading the CT-GAN models ...", flush=True)
    manip.model("inject")
    manip.model("remove")
    import matplotlib.pyplot as plt

    viewer = Viewer(scan, manip, args.out, protected, window=window, fmt=args.format, key=key)
    viewer.build()
    plt.show()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
