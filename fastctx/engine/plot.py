"""Training curves of several runs in one PNG (matplotlib, headless Agg backend)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_runs"]


def plot_runs(runs: Mapping[str, Sequence[dict[str, Any]]], path: str | Path, title: str | None = None) -> Path:
    """Plot training loss and validation mIoU against iteration for each run's JSON-lines records.

    `runs` maps a run name to its log records ({"mode": "train", "iter", "loss"}
    and {"mode": "val", "iter", "mIoU"}). Writes a PNG to `path`.
    """
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib (or fastctx[plot])") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in runs.items():
        train = [(r["iter"], r["loss"]) for r in records if r.get("mode") == "train" and r.get("loss") is not None]
        val = [(r["iter"], r["mIoU"]) for r in records if r.get("mode") == "val" and r.get("mIoU") is not None]
        if train:
            ax_loss.plot(*zip(*train), label=name)
        if val:
            ax_miou.plot(*zip(*val), marker="o", label=name)
    ax_loss.set(xlabel="iteration", ylabel="training loss", title="training loss")
    ax_miou.set(xlabel="iteration", ylabel="mIoU (%)", title="validation mIoU")
    for ax in (ax_loss, ax_miou):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
