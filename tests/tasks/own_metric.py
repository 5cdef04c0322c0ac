"""Metric functions a recipe names by import path (`tests.tasks.own_metric:...`) in the custom task's tests."""

from __future__ import annotations

CALLS: list[tuple[str, str]] = []


def short_answer(prediction: str, reference: str) -> float:
    """1 for a reference of at most 3 characters: a grade that splits rows whatever a random model says."""
    CALLS.append((prediction, reference))
    return 1.0 if len(reference) <= 3 else 0.0


def too_big(prediction: str, reference: str) -> float:
    return 2.0


def broken(prediction: str, reference: str) -> float:
    raise ZeroDivisionError("no")


NOT_A_FUNCTION = 3
