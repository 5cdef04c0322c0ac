"""The sweep report's pictures: what a reader looks at before the table.

- the Pareto plot answers "which methods buy the most quality per active parameter",
- the rank-share bars show how often the router picked each rank (a Flexi row that always routes to
  the high rank is just an expensive LoRA),
- the σ curve shows whether the router's training noise matters.

`report.py` does the averaging and hands over plain numbers, so these functions only draw. Each figure
is saved to a temp file beside its target and renamed, so a crash never leaves half a PNG behind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from flexi_workflows.plots import _pyplot


def _save_atomic(fig, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return path


def _rank_order(rank: str) -> tuple:
    """Ranks as numbers ("2" below "16"), so the stacks read from the smallest rank up."""
    return (0, int(rank), "") if rank.isdigit() else (1, 0, rank)


def pareto_front(points: Sequence[dict], lower_is_better: bool = False) -> list[dict]:
    """Points no other point beats on both counts: fewer (or equal) parameters and a better metric.

    Walking from the fewest parameters up, a point is on the front when its metric beats every point
    before it.
    """

    def better(a: float, b: float) -> bool:
        return a < b if lower_is_better else a > b

    ordered = sorted(points, key=lambda p: (p["x"], p["y"] if lower_is_better else -p["y"]))
    front: list[dict] = []
    for point in ordered:
        if not front or better(point["y"], front[-1]["y"]):
            front.append(point)
    return front


def pareto_plot(points: Sequence[dict], path: Path, *, ylabel: str, lower_is_better: bool = False,
                title: str = "") -> Path:
    """Metric (%) against mean active parameters; points are {label, x, y, yerr}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for point in points:
        ax.errorbar([point["x"]], [point["y"]], yerr=[point["yerr"]], fmt="o", capsize=3, ms=5)
        ax.annotate(point["label"], (point["x"], point["y"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    front = pareto_front(points, lower_is_better)
    if front:
        ax.plot([p["x"] for p in front], [p["y"] for p in front], "--", color="grey", lw=1,
                label="Pareto front", zorder=0)
        ax.legend(fontsize=8, loc="best")
    if not points:
        ax.text(0.5, 0.5, "no results to plot", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("mean active parameters")
    positive = sorted(p["x"] for p in points if p["x"] > 0)
    if positive and positive[-1] > 20 * positive[0]:
        # full fine-tuning next to rank-2 adapters: a linear axis would crush every adapter into one
        # column; symlog keeps 0 (the base model) on the axis and spreads the orders of magnitude
        ax.set_xscale("symlog", linthresh=positive[0] / 2)
        ax.set_xlabel("mean active parameters (log scale above the smallest method)")
    ax.set_ylabel(ylabel + (" — lower is better" if lower_is_better else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_atomic(fig, path)
    plt.close(fig)
    return Path(path)


def rank_shares_plot(bars: Sequence[dict], path: Path) -> Path:
    """Stacked bars of routed-rank shares; bars are {label, shares: {rank: share}}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(bars) + 2), 4))
    if not bars:
        ax.text(0.5, 0.5, "no routed methods in this sweep", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        ranks = sorted({r for bar in bars for r in bar["shares"]}, key=_rank_order)
        positions = range(len(bars))
        bottom = [0.0] * len(bars)
        for rank in ranks:
            heights = [float(bar["shares"].get(rank) or 0.0) for bar in bars]
            ax.bar(positions, heights, bottom=bottom, label=f"rank {rank}")
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(list(positions))
        ax.set_xticklabels([bar["label"] for bar in bars], rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share of eval inputs (mean over seeds)")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_title("routed ranks")
    fig.tight_layout()
    _save_atomic(fig, path)
    plt.close(fig)
    return Path(path)


def metric_vs_noise_plot(panels: Sequence[dict], path: Path, *, xlabel: str, ylabel: str) -> Path:
    """One panel per dataset, one line per method in it.

    A panel is {title, series: [{label, points: [(sigma, mean, std)]}], references: [{label, y}]}.
    Rows that do not depend on σ (LoRA-8, the base model) are the references, drawn as dotted horizontal
    lines so the curves can be read against them.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for line in panel["series"]:
            points = line["points"]
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                        marker="o", capsize=3, label=line["label"])
        for ref in panel["references"]:
            ax.axhline(ref["y"], ls=":", lw=1, color="grey")
            ax.annotate(ref["label"], (0.01, ref["y"]), xycoords=("axes fraction", "data"), fontsize=7,
                        color="grey", va="bottom")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel["title"])
        ax.grid(alpha=0.3)
        if panel["series"]:
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save_atomic(fig, path)
    plt.close(fig)
    return Path(path)
