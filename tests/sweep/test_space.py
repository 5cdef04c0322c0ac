"""Search spaces → trials, and bad sweeps refused before any trial starts (no Ray needed)."""

from __future__ import annotations

import pytest
import yaml

from flexi_workflows.cli import main
from flexi_workflows.errors import ConfigError
from flexi_workflows.sweep.space import expand_space
from tests.helpers import write_math_set


def test_grids_multiply_and_draws_repeat_per_sample():
    trials = expand_space({"method.ranks": [[1, 8], [2, 8]], "router.noise_std": {"grid": [0.0, 0.1, 0.3]},
                           "training.lr": {"loguniform": [1e-4, 1e-2]}}, num_samples=2, seed=3)
    assert len(trials) == 12
    assert len({t.trial_id for t in trials}) == 12
    assert all(1e-4 <= t.overrides["training.lr"] <= 1e-2 for t in trials)
    assert list(trials[0].overrides) == ["method.ranks", "router.noise_std", "training.lr"]
    again = expand_space({"method.ranks": [[1, 8], [2, 8]], "router.noise_std": {"grid": [0.0, 0.1, 0.3]},
                          "training.lr": {"loguniform": [1e-4, 1e-2]}}, num_samples=2, seed=3)
    assert [t.overrides for t in again] == [t.overrides for t in trials], "the same sweep means the same trials"
    assert expand_space({"seed": [0, 1]}, num_samples=3) == expand_space({"seed": [0, 1]}), "a repeated pure grid runs once"
    assert trials[0].override_args()[0] == "method.ranks=[1, 8]"


@pytest.mark.parametrize("space,message", [
    ({}, "sweep.space is empty"),
    ({"router.noise_std": []}, r"sweep.space.router.noise_std: the grid is empty"),
    ({"router.noise_std": {"choice": []}}, r"sweep.space.router.noise_std: the choice is empty"),
    ({"training.lr": {"uniform": [0.1]}}, r"sweep.space.training.lr: uniform takes \[low, high\]"),
    ({"training.lr": {"loguniform": [0.0, 1.0]}}, r"loguniform needs low > 0"),
    ({"training.lr": 0.1}, r"sweep.space.training.lr: expected a list"),
])
def test_malformed_spaces_name_the_key(space, message):
    with pytest.raises(ConfigError, match=message):
        expand_space(space)


@pytest.fixture
def sweep_recipe(tmp_path, tiny_model_dir):
    def write(**sweep):
        train, evals = write_math_set(tmp_path / "train.jsonl", 16), write_math_set(tmp_path / "eval.jsonl", 4)
        recipe = {
            "name": "bad-sweep", "output_dir": str(tmp_path / "out"),
            "model": {"name_or_path": str(tiny_model_dir)},
            "task": {"name": "math", "train": {"path": str(train)}, "eval": [{"name": "mini", "path": str(evals)}]},
            "method": {"name": "flexi", "ranks": [2, 8]},
            "sweep": {"space": {"router.noise_std": [0.0, 0.1]}, "metric": "accuracy_all", **sweep},
        }
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path
    return write


@pytest.mark.parametrize("sweep,message", [
    ({"space": {"router.noise_sdt": [0.0, 0.1]}}, r"unknown key 'router.noise_sdt'; did you mean 'router.noise_std'"),
    ({"space": {"router.noise_std": []}}, r"sweep.space.router.noise_std: the grid is empty"),
    ({"metric": "bleu_all"}, r"sweep.metric 'bleu_all' is not reported by the trials; they report: .*accuracy_all"),
    ({"space": {"router.noise_std": [0.1, "high"]}}, r"sweep.space.router.noise_std.*router.noise_std must be a number, got 'high'"),
    ({"space": {"method.ranks": [[2, 8], [8, 2]]}}, r"sweep.space.method.ranks.*strictly increasing"),
    ({"space": {"tracking.experiment": ["a", "b"]}}, r"sweep.space.tracking.experiment: this key does not change a trial's result"),
    ({"dataset": "nope"}, r"sweep.dataset 'nope' is not an eval set"),
])
def test_bad_sweeps_fail_before_any_trial_with_the_key_named(sweep_recipe, tmp_path, capsys, sweep, message):
    path = sweep_recipe(**sweep)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sweep.yaml" in err and "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists(), "nothing was written"
