"""PNG grids of image batches, one row per method (the demos' pictures)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import Tensor


def save_grid(path: Path, rows: Sequence[tuple[str, Tensor]], *, dpi: int = 110) -> None:
    """PNG grid: one row per method, ``rows`` = [(title, images [N, 1, H, W] in [-1, 1]), ...]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9 + 1.2, len(rows) * 0.95),
                             squeeze=False)
    for r, (title, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c, 0].detach().clamp(-1, 1).cpu().numpy(), cmap="gray", vmin=-1,
                      vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
