"""A sweep's search space → its list of trials, validated before any trial starts.

The trials are enumerated here (grids multiplied, draws from a seeded generator) rather than left
to Tune's lazy sampling, for two reasons: every trial's stage graph can be planned up front, so the
stages trials share run once before them; and the same sweep always means the same trials, so an
interrupted sweep resumes instead of drawing new ones. Tune then schedules exactly these trials.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from flexi_workflows.errors import ConfigError
from flexi_workflows.fsutil import fingerprint

FORMS = ("grid", "choice", "uniform", "loguniform")


@dataclass
class Trial:
    trial_id: str
    overrides: dict[str, Any]  # recipe key → value

    def override_args(self) -> list[str]:
        return [f"{key}={json.dumps(value)}" for key, value in self.overrides.items()]


def parse_spec(key: str, spec: Any, where: str) -> tuple[str, Any]:
    """(form, values-or-bounds) for one search-space entry; errors name `sweep.space.<key>`."""
    name = f"{where}sweep.space.{key}"
    if isinstance(spec, list):
        form, values = "grid", spec
    elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in FORMS:
        form, values = next(iter(spec.items()))
    else:
        raise ConfigError(f"{name}: expected a list of values (a grid) or one of "
                          f"{{grid|choice: [...]}}, {{uniform|loguniform: [low, high]}}; got {spec!r}")
    if form in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{name}: the {form} is empty; list at least one value")
        return form, values
    if (not isinstance(values, list) or len(values) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise ConfigError(f"{name}: {form} takes [low, high] numbers, got {values!r}")
    low, high = float(values[0]), float(values[1])
    if not low < high:
        raise ConfigError(f"{name}: {form} needs low < high, got [{low}, {high}]")
    if form == "loguniform" and low <= 0:
        raise ConfigError(f"{name}: loguniform needs low > 0, got {low}")
    return form, (low, high)


def expand_space(space: dict[str, Any], *, num_samples: int = 1, seed: int = 0, where: str = "") -> list[Trial]:
    """Every trial of the sweep: the grid's product, repeated num_samples times with fresh draws."""
    if not space:
        raise ConfigError(f"{where}sweep.space is empty: name at least one recipe key to vary")
    specs = {key: parse_spec(key, spec, where) for key, spec in space.items()}
    grid_keys = [k for k, (form, _) in specs.items() if form == "grid"]
    rng = np.random.default_rng(seed)
    trials, seen = [], set()
    for _ in range(num_samples):
        for point in itertools.product(*(specs[k][1] for k in grid_keys)):
            values = dict(zip(grid_keys, point))
            for key, (form, arg) in specs.items():
                if form == "choice":
                    values[key] = arg[int(rng.integers(len(arg)))]
                elif form == "uniform":
                    values[key] = float(rng.uniform(*arg))
                elif form == "loguniform":
                    values[key] = float(math.exp(rng.uniform(math.log(arg[0]), math.log(arg[1]))))
            overrides = {key: values[key] for key in space}  # the space's order
            trial_id = f"t{len(trials):03d}-{fingerprint(overrides)[:8]}"
            key = fingerprint(overrides)
            if key in seen:  # a pure grid repeated by num_samples: the same trial, run once
                continue
            seen.add(key)
            trials.append(Trial(trial_id, overrides))
    return trials
