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


def test_pass_rates_over_k_samples_make_three_classes():
    from flexi_workflows.scoring.difficulty import pass_rates, sampled_classes, score_histogram

    # k = 4 graded answers per row (1 = right): 4, 3, 2, 1, 0 right
    grades = [[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    rates, classes = sampled_classes(grades, [0.75, 0.25])
    assert rates.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert classes.tolist() == [0, 0, 1, 1, 2], "3-4 right easy, 1-2 medium, none hard"
    assert set(classes.tolist()) == {0, 1, 2}
    assert score_histogram(rates, 4) == {"0/4": 1, "1/4": 1, "2/4": 1, "3/4": 1, "4/4": 1}
    assert pass_rates([[0.5, 1.0]]).tolist() == [0.75], "QA: the mean F1 over the samples"
    assert pass_rates([]).size == 0
    with pytest.raises(DataError, match="same number"):
        pass_rates([[1, 0], [1]])
    with pytest.raises(DataError, match="NaN"):
        pass_rates([[1, float("nan")]])


def test_math_thresholds_must_leave_every_class_reachable():
    from flexi_workflows.recipes.loader import build
    from flexi_workflows.recipes.schema import Recipe

    three = {"num_classes": 3, "thresholds": [0.75, 0.25], "class_names": ["easy", "medium", "hard"]}
    with pytest.raises(ConfigError, match=r"scoring\.thresholds \[0\.75, 0\.25\] leave classes \[1\] empty.*"
                                          r"scoring\.num_samples > 1"):
        build(Recipe, {"task": {"name": "math"}, "scoring": three, "method": {"name": "lora"}})
    recipe = build(Recipe, {"task": {"name": "math"}, "scoring": {**three, "num_samples": 4}, "method": {"name": "lora"}})
    assert recipe.scoring.sampling
    with pytest.raises(ConfigError, match=r"leave classes \[1\] empty.*0/4, 1/4, 2/4, 3/4, 4/4"):
        build(Recipe, {"task": {"name": "math"}, "scoring": {**three, "num_samples": 4, "thresholds": [0.9, 0.8]},
                       "method": {"name": "lora"}})
    # QA's F1 is not 0/1: three classes from one greedy answer are fine
    build(Recipe, {"task": {"name": "qa"}, "scoring": three, "method": {"name": "lora"}})
    with pytest.raises(ConfigError, match=r"scoring\.temperature must be > 0"):
        build(Recipe, {"scoring": {"temperature": 0.0}})
    with pytest.raises(ConfigError, match=r"scoring\.top_p must be > 0 and ≤ 1"):
        build(Recipe, {"scoring": {"top_p": 1.5}})
    with pytest.raises(ConfigError, match=r"scoring\.num_samples must be ≥ 1"):
        build(Recipe, {"scoring": {"num_samples": 0}})
