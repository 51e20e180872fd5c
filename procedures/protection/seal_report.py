"""What a seal verification found, for people: tampered regions (voxel, world and slice boxes),
the tamper map in the scan's geometry, and a PNG of the most affected slices (docs/seal.md)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from procedures.protection.seal import Verification
from utils.atomic import atomic_path, removed_on_failure
from utils.scan import Scan, vox2world

# The PNG's grey levels: a lung-and-soft-tissue window, as GUI.py shows scans.
_WINDOW = (-1000.0, 400.0)


@dataclass
class Region:
    """One connected group of failing blocks (26-connectivity over z, block row, block column)."""
    blocks: int
    lo: tuple[int, int, int]          # voxel box (z, y, x), inclusive
    hi: tuple[int, int, int]
    world_lo: tuple[float, float, float]   # world box (z, y, x) mm
    world_hi: tuple[float, float, float]

    def contains(self, vox) -> bool:
        return all(a <= v <= b for a, v, b in zip(self.lo, vox, self.hi))

    def line(self, i: int) -> str:
        w = ", ".join(f"{a:.1f}..{b:.1f}" for a, b in zip(self.world_lo, self.world_hi))
        return (f"region {i}: slices {self.lo[0]}-{self.hi[0]}, {self.blocks} blocks; voxels "
                f"z {self.lo[0]}-{self.hi[0]}, y {self.lo[1]}-{self.hi[1]}, "
                f"x {self.lo[2]}-{self.hi[2]}; "
                f"world (z, y, x) mm {w}")


def tamper_regions(v: Verification, scan: Scan) -> list[Region]:
    """The failing blocks as connected regions, largest first, with voxel and world boxes."""
    from scipy import ndimage  # lazy: SciPy only when something failed

    if not v.failed.any():
        return []
    labels, n = ndimage.label(v.failed, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), 1):
        zs, rs, cs = sl
        lo = (zs.start, v.grid.rows(rs.start)[0], v.grid.cols(cs.start)[0])
        hi = (zs.stop - 1, v.grid.rows(rs.stop - 1)[1] - 1, v.grid.cols(cs.stop - 1)[1] - 1)
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1])
                            for c in (lo[2], hi[2])])
        w = vox2world(corners, scan.spacing, scan.origin, scan.direction)
        out.append(Region(int(sizes[i]), lo, hi, tuple(float(t) for t in w.min(axis=0)),
                          tuple(float(t) for t in w.max(axis=0))))
    return sorted(out, key=lambda r: -r.blocks)


def voxel_map(v: Verification) -> np.ndarray:
    """The tamper map voxel by voxel: 1 where the voxel's block failed, else 0 (uint8)."""
    g = v.grid
    by = np.minimum(np.arange(g.ny) // g.block, g.nby - 1)
    bx = np.minimum(np.arange(g.nx) // g.block, g.nbx - 1)
    return v.failed[:, by[:, None], bx[None, :]].astype(np.uint8)


def summary_lines(v: Verification, regions: list[Region]) -> list[str]:
    """The verdict, then one line per region, moved slice and shape change."""
    n, total = int(v.failed.sum()), v.failed.size
    b = v.grid.block
    if v.intact:
        return [f"intact: all {total:,} blocks of {b} x {b} voxels verify"]
    lines = [f"tampered: {len(regions)} region(s), {n:,} of {total:,} blocks of {b} x {b} "
             f"voxels fail"]
    if v.cropped:
        lines.append("shape changed: the seal was made on a {} scan; this one is {}".format(
            " x ".join(map(str, v.header.shape)), " x ".join(map(str, v.shape))))
    if v.cut is not None:
        z, y, x = v.cut
        lines.append(f"cut on the left or top: this scan starts at voxel (z, y, x) = "
                     f"({z}, {y}, {x}) of the sealed scan; every block is flagged")
    lines += [r.line(i) for i, r in enumerate(regions, 1)]
    lines += _moved_lines(v.moved)
    return lines


def _moved_lines(moved: dict[int, int]) -> list[str]:
    """'slices 0-5 hold sealed slices 2-7 (moved)': runs of slices moved by the same offset."""
    runs: list[list[int]] = []
    for z in sorted(moved):
        if runs and z == runs[-1][1] + 1 and moved[z] - z == moved[runs[-1][0]] - runs[-1][0]:
            runs[-1][1] = z
        else:
            runs.append([z, z])
    out = []
    for a, b in runs:
        if a == b:
            out.append(f"slice {a} holds sealed slice {moved[a]} (moved)")
        else:
            out.append(f"slices {a}-{b} hold sealed slices {moved[a]}-{moved[b]} (moved)")
    return out


def _most_affected(v: Verification, k: int = 3) -> list[int]:
    per = v.failed.reshape(len(v.failed), -1).sum(axis=1)
    if not per.any():
        return [len(per) // 2]
    order = [int(z) for z in np.argsort(-per, kind="stable") if per[z] > 0]
    return sorted(order[:k])


def save_png(path: Path, hu: np.ndarray, vmap: np.ndarray, v: Verification, title: str) -> Path:
    """The most affected slices (up to 3) in a lung window, failing blocks in red."""
    import matplotlib  # lazy: only verify.py -o draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zs = _most_affected(v)
    fig, axes = plt.subplots(1, len(zs), figsize=(4.2 * len(zs), 4.6), squeeze=False)
    for ax, z in zip(axes[0], zs):
        ax.imshow(hu[z], cmap="gray", vmin=_WINDOW[0], vmax=_WINDOW[1], interpolation="nearest")
        overlay = np.zeros(vmap.shape[1:] + (4,), np.float32)
        overlay[vmap[z] > 0] = (1.0, 0.1, 0.1, 0.45)
        ax.imshow(overlay, interpolation="nearest")
        ax.set_title(f"slice {z}: {int(v.failed[z].sum())} blocks fail", fontsize=10)
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def write_outputs(outdir: Path, stem: str, scan: Scan, v: Verification, title: str) -> list[Path]:
    """<stem>_tampermap.mhd (one value per voxel, the scan's geometry) and <stem>_tampermap.png;
    neither is left behind when the other fails."""
    from utils.scan_io import save_mhd

    vmap = voxel_map(v)
    mhd, png = outdir / f"{stem}_tampermap.mhd", outdir / f"{stem}_tampermap.png"
    outdir.mkdir(parents=True, exist_ok=True)
    with removed_on_failure(outdir, mhd.name, mhd.with_suffix(".zraw").name, png.name):
        geo = Scan(vmap, scan.spacing, scan.origin, scan.direction)
        save_mhd(geo, mhd, compress=True)
        save_png(png, scan.hu, vmap, v, title)
    return [mhd, png]
