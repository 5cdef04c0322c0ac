"""From metric scores to difficulty classes, and class-balanced sampling (pure functions)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from flexi_workflows.errors import ConfigError, DataError


def assign_classes(scores: Sequence[float], thresholds: Sequence[float], *, higher_is_better: bool = True) -> np.ndarray:
    """Class k = number of thresholds the score falls short of; class 0 is easiest.

    Higher is better (accuracy, F1), thresholds descend: with [0.5], score ≥ 0.5 → 0 (easy), else 1
    (hard); with [0.8, 0.3]: ≥ 0.8 → 0, [0.3, 0.8) → 1, < 0.3 → 2. Lower is better (WER), thresholds
    ascend: with [0.1, 0.5], WER ≤ 0.1 → 0, (0.1, 0.5] → 1, > 0.5 → 2.
    """
    pairs = list(zip(thresholds, thresholds[1:]))
    if higher_is_better and any(a <= b for a, b in pairs):
        raise ConfigError(f"thresholds must be strictly decreasing, got {list(thresholds)}")
    if not higher_is_better and any(a >= b for a, b in pairs):
        raise ConfigError(f"thresholds on an error rate must be strictly increasing, got {list(thresholds)}")
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise DataError("a score is NaN; every scored row needs a metric value")
    cuts = np.asarray(thresholds, dtype=np.float64)[None, :]
    below = scores[:, None] > cuts if not higher_is_better else scores[:, None] < cuts
    return below.sum(axis=1).astype(np.int64)


def pass_rates(grades: Sequence[Sequence[float]]) -> np.ndarray:
    """Each row's mean grade over its k graded answers: for math (grades 0 / 1) the pass rate, the share
    of the k sampled answers that are right. Every row needs the same k ≥ 1 grades."""
    rows = [list(g) for g in grades]
    if not rows:
        return np.zeros(0, dtype=np.float64)
    k = len(rows[0])
    if k < 1 or any(len(g) != k for g in rows):
        raise DataError(f"every row needs the same number (≥ 1) of graded answers; got {sorted({len(g) for g in rows})}")
    matrix = np.asarray(rows, dtype=np.float64)
    if np.isnan(matrix).any():
        raise DataError("a grade is NaN; every sampled answer needs a metric value")
    return matrix.mean(axis=1)


def sampled_classes(grades: Sequence[Sequence[float]], thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(pass rate, difficulty class) per row from k graded samples per row: the rate is the row's
    score and the thresholds cut it, e.g. k = 4, thresholds [0.75, 0.25]: 3-4 right → 0 (easy),
    1-2 → 1 (medium), 0 → 2 (hard)."""
    rates = pass_rates(grades)
    return rates, assign_classes(rates, thresholds)


def score_histogram(scores: Sequence[float], num_samples: int) -> dict[str, int]:
    """Rows per attainable pass rate j/k ("0/4": 12, ...), for choosing thresholds on sampled scores."""
    scores = np.asarray(scores, dtype=np.float64)
    hits = np.rint(scores * num_samples).astype(np.int64)
    return {f"{j}/{num_samples}": int((hits == j).sum()) for j in range(num_samples + 1)}


def class_stats(classes: Sequence[int], class_names: Sequence[str], scores: Sequence[float] | None = None) -> dict:
    classes = np.asarray(classes)
    total = int(classes.size)
    out = {"total": total, "classes": []}
    for k, name in enumerate(class_names):
        mask = classes == k
        entry = {"class": k, "name": name, "count": int(mask.sum()), "share": float(mask.mean()) if total else 0.0}
        if scores is not None and mask.any():
            entry["mean_score"] = float(np.asarray(scores, dtype=np.float64)[mask].mean())
        out["classes"].append(entry)
    return out


def balanced_indices(classes: Sequence[int], num_classes: int, seed: int) -> np.ndarray:
    """Indices with every class equally represented: each class down-sampled to the smallest one.

    The paper balances easy and hard samples for router training; a class with no samples at all
    makes that impossible and is an error (usually thresholds that do not fit the metric).
    """
    classes = np.asarray(classes)
    counts = np.bincount(classes, minlength=num_classes)
    if (counts == 0).any():
        empty = [k for k in range(num_classes) if counts[k] == 0]
        raise DataError(
            f"difficulty classes {empty} have no samples (counts {counts.tolist()}); balanced router training "
            f"needs every class — adjust scoring.thresholds or use more data"
        )
    rng = np.random.default_rng(seed)
    n = counts.min()
    picked = [rng.choice(np.flatnonzero(classes == k), size=n, replace=False) for k in range(num_classes)]
    return np.sort(np.concatenate(picked))


def class_weights(classes: Sequence[int], num_classes: int) -> np.ndarray:
    """Inverse-frequency weights (mean 1 over samples) for loss re-weighting instead of down-sampling."""
    counts = np.bincount(np.asarray(classes), minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise DataError(f"difficulty classes with no samples: counts {counts.astype(int).tolist()}")
    return counts.sum() / (num_classes * counts)
