"""Figures: sample grids [real | protected | tampered | difference] (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.atomic import atomic_path


def save_grid(path, columns: dict[str, list[np.ndarray | None]], title: str = "",
              hu_window=(-1000.0, 400.0), diff_columns=("difference",)) -> None:
    """One row per slice, one column per named image list. CT columns share a HU window;
    difference columns get their own symmetric scale. None draws an empty 'n/a' tile."""
    import matplotlib  # lazy: matplotlib only when a figure is drawn (fast --help)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    rows = max(len(v) for v in columns.values())
    fig, axes = plt.subplots(
        rows, len(names), figsize=(2.6 * len(names), 2.6 * rows), squeeze=False
    )
    for c, name in enumerate(names):
        col = columns[name]
        finite = [a for a in col if a is not None]
        vmax = max((float(np.abs(a).max()) for a in finite), default=1.0) or 1.0
        for r in range(rows):
            ax = axes[r, c]
            ax.set_xticks([]); ax.set_yticks([])
            img = col[r] if r < len(col) else None
            if img is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            elif name in diff_columns:
                ax.imshow(img, cmap="seismic", vmin=-vmax, vmax=vmax)
            else:
                ax.imshow(img, cmap="gray", vmin=hu_window[0], vmax=hu_window[1])
            if r == 0:
                ax.set_title(
                    name if name not in diff_columns else f"{name} (±{vmax:.0f} HU)", fontsize=9
                )
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
