"""The range of every number a recipe can set, checked where the value is read.

A number out of range is the cheapest mistake to make and, unchecked, the most expensive to find:
`evaluation.batch_size: 0` or `training.lr: .nan` used to surface only after scoring had run for a
minute, and `task.max_prompt_tokens: 0` silently meant "no truncation" (`ids[-0:]` is the whole list).
The loader checks each value it converts against the bound for its dataclass field, so the error names
the recipe line or the override, before any Ray or model work.

Bounds are looked up by dataclass name and field along the class's MRO (a method config inherits its
base's bounds); a list of numbers (`ranks`, `thresholds`) is checked item by item. Every int or float
field of the recipe schema must have an entry: tests/recipes/test_bounds.py enforces that, so a new
numeric key cannot arrive unchecked. Floats must also be finite (the loader checks that for every
float, bounded or not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded
    high_open: bool = False  # high itself is excluded

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '≥'} {_num(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '≤'} {_num(self.high)}")
        return " and ".join(parts)

    def admits(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def at_least(low: float) -> Bound:
    return Bound(low=low)


def above(low: float) -> Bound:
    return Bound(low=low, low_open=True)


COUNT = at_least(1)  # sizes, steps, epochs, actors: zero would do nothing or divide by zero
SEED = at_least(0)  # numpy and torch seeds are unsigned
NON_NEGATIVE = at_least(0)
POSITIVE = above(0)
FRACTION = Bound(0, 1)  # a share, both ends allowed
OPEN_FRACTION = Bound(0, 1, high_open=True)  # a probability that must leave something (dropout < 1)

BOUNDS: dict[str, dict[str, Bound]] = {
    "Recipe": {"seed": SEED},
    "DataSource": {"limit": COUNT, "seed": SEED},
    "TaskConfig": {"max_prompt_tokens": COUNT, "max_target_tokens": COUNT},
    "ScoringConfig": {
        "batch_size": COUNT, "max_new_tokens": COUNT, "num_actors": COUNT, "cpus_per_actor": POSITIVE,
        "gpus_per_actor": NON_NEGATIVE, "num_classes": at_least(2), "thresholds": Bound(),
        "num_samples": COUNT, "temperature": NON_NEGATIVE, "top_p": Bound(0, 1, low_open=True), "seed": SEED,
    },
    "RouterConfig": {
        "hidden_size": COUNT, "noise_std": NON_NEGATIVE, "epochs": COUNT, "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE, "batch_size": COUNT, "holdout": Bound(0, 1, low_open=True, high_open=True),
    },
    "MethodConfig": {"lr": POSITIVE},
    "AdapterFields": {"alpha": POSITIVE, "dropout": OPEN_FRACTION},
    "LoraConfig": {"rank": COUNT},
    "AdaLoraConfig": {"init_rank": COUNT},
    "RankRangeFields": {"r_min": COUNT, "r_max": COUNT},
    "DyLoraConfig": {"eval_rank": COUNT},
    "FlexiConfig": {"ranks": COUNT},
    "TrainingConfig": {
        "epochs": COUNT, "max_steps": COUNT, "lr": POSITIVE, "warmup_ratio": Bound(0, 1, high_open=True),
        "weight_decay": NON_NEGATIVE, "micro_batch_size": COUNT, "gradient_accumulation_steps": COUNT,
        "max_grad_norm": POSITIVE, "checkpoint_every": NON_NEGATIVE,  # 0: only at epoch ends
        "log_every": COUNT, "max_failures": NON_NEGATIVE, "validation_rows": NON_NEGATIVE,
        "eval_every": NON_NEGATIVE,  # 0: only at the end of each epoch
    },
    "TrackingConfig": {"system_metrics_interval": NON_NEGATIVE},  # 0: no system metrics
    "DistributionConfig": {
        "num_workers": COUNT, "cpus_per_worker": POSITIVE, "gpus_per_worker": NON_NEGATIVE,
        "zero_stage": Bound(), "torch_threads": COUNT,  # zero_stage: its own message (0, 1, 2 or 3)
    },
    "EvalConfig": {
        "batch_size": COUNT, "max_new_tokens": COUNT, "num_actors": COUNT, "cpus_per_actor": POSITIVE,
        "gpus_per_actor": NON_NEGATIVE,
    },
    "RayConfig": {"num_cpus": COUNT},
    "SweepConfig": {"num_samples": COUNT, "sample_seed": SEED, "max_concurrent_trials": COUNT,
                    "trial_cpus": NON_NEGATIVE},
    "SchedulerConfig": {"grace_period": COUNT, "reduction_factor": above(1)},
}


def bound_for(cls: type, field: str) -> Bound | None:
    for klass in cls.__mro__:
        bound = BOUNDS.get(klass.__name__, {}).get(field)
        if bound is not None:
            return bound
    return None


def check_number(value: object, bound: Bound | None) -> str | None:
    """None if `value` is acceptable, else what it must be (for the loader's message)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # not a number: the type check reports it
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    if bound is not None and not bound.admits(value):
        return bound.describe()
    return None
