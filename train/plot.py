"""The loss-curve PNG drawn from a run's metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from train.metrics import read_jsonl


def loss_curve(metrics_path: Path, out_png: Path, title: str | None = None) -> Path:
    """Plot training loss (and validation loss where present) against step; return the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, style in (("loss", "-"), ("val_loss", "o-")):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=key, markersize=3, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title or Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
