"""Class assignment and balancing on scores that are known."""

from __future__ import annotations

import numpy as np
import pytest

from flexi_workflows.errors import ConfigError, DataError
from flexi_workflows.scoring.difficulty import assign_classes, balanced_indices, class_stats, class_weights


def test_two_classes_correct_is_easy():
    assert assign_classes([1.0, 0.0, 1.0, 0.0, 0.0], [0.5]).tolist() == [0, 1, 0, 1, 1]


def test_three_classes_on_f1():
    scores = [0.9, 0.8, 0.79, 0.3, 0.29, 0.0]
    assert assign_classes(scores, [0.8, 0.3]).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError):
        assign_classes(scores, [0.3, 0.8])
    with pytest.raises(DataError, match="NaN"):
        assign_classes([float("nan")], [0.5])


def test_stats():
    stats = class_stats([0, 1, 1, 1], ["easy", "hard"], [1.0, 0.0, 0.0, 0.5])
    assert stats["total"] == 4
    assert [c["count"] for c in stats["classes"]] == [1, 3]
    assert stats["classes"][1]["share"] == 0.75
    assert stats["classes"][1]["mean_score"] == pytest.approx(1 / 6)


def test_balanced_indices_equalise_classes_and_are_seeded():
    classes = np.array([0] * 30 + [1] * 10 + [2] * 5)
    idx = balanced_indices(classes, 3, seed=0)
    assert np.bincount(classes[idx]).tolist() == [5, 5, 5]
    assert len(set(idx.tolist())) == 15
    assert balanced_indices(classes, 3, seed=0).tolist() == idx.tolist()
    assert balanced_indices(classes, 3, seed=1).tolist() != idx.tolist()
    with pytest.raises(DataError, match="have no samples"):
        balanced_indices(np.array([0, 0, 2]), 3, seed=0)


def test_class_weights_are_inverse_frequency():
    w = class_weights([0, 0, 0, 1], 2)
    assert w.tolist() == pytest.approx([4 / 6, 2.0])
