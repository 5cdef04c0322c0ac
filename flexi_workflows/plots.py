"""Pictures people would rather see than read: loss curves, routed-rank histograms, the Pareto plot."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve_plot(curve: Sequence[Sequence[float]], path: Path, title: str = "") -> Path | None:
    if not curve:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in curve], [p[1] for p in curve], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title(f"loss — {title}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def rank_histogram_plot(histogram: dict[str, int], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    ranks = sorted(histogram, key=int)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(range(len(ranks)), [histogram[r] for r in ranks], color="#4a7bd0", tick_label=ranks)
    ax.set_xlabel("LoRA rank used")
    ax.set_ylabel("inputs")
    ax.set_title(f"routed ranks — {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def pareto_plot(rows: Sequence[dict], path: Path, metric: str = "accuracy_all", lower_is_better: bool = False) -> Path:
    """The task metric against mean active parameters, one point per method (an error rate such as WER
    says it is lower-is-better on its axis)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        x, y = row.get("mean_active_params"), row.get(metric)
        if x is None or y is None:
            continue
        ax.scatter([x], [100 * y], s=40)
        ax.annotate(row["method"], (x, 100 * y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("mean active parameters")
    ax.set_ylabel(f"{metric} (%)" + (" — lower is better" if lower_is_better else ""))
    ax.set_title(f"{metric.split('_')[0]} vs parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
