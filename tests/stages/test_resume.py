"""`training.resume` starts a run from another run's checkpoint (Ray Train V2 has no
resume_from_checkpoint), and `--force` trains every step again into a fresh checkpoint folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexi_workflows.stages.train import RAY_RESULTS, REPORT, run_train
from flexi_workflows.training.loop import STATE_FILE
from tests.helpers import small_recipe

pytestmark = pytest.mark.slow


def _report(result):
    return json.loads((result.folder / REPORT).read_text())


def test_resume_continues_at_the_checkpoints_step_and_force_starts_over(tmp_path, tiny_model_dir, ray_local):
    lora = {"name": "lora", "rank": 4}
    first = small_recipe(tmp_path / "a", tiny_model_dir, method=lora,
                         training={"epochs": 1, "max_steps": 4, "checkpoint_every": 2})
    report = _report(run_train(first, first.method))
    assert (report["steps"], report["resumed_from_step"]) == (4, 0)

    checkpoints = {json.loads((c / STATE_FILE).read_text())["step"]: c
                   for c in Path(first.output_dir).rglob(f"{RAY_RESULTS}/*/checkpoint_*")
                   if (c / STATE_FILE).is_file()}
    assert 4 in checkpoints, checkpoints
    second = small_recipe(tmp_path / "b", tiny_model_dir, method=lora,
                          training={"epochs": 1, "max_steps": 8, "checkpoint_every": 4, "resume": str(checkpoints[4])})
    report = _report(run_train(second, second.method))
    assert report["resumed_from_step"] == 4 and report["steps"] == report["total_steps"] == 8
    assert [s for s, _ in report["loss_curve"]] == list(range(1, 9)), "the first run's curve, then its own"

    again = _report(run_train(first, first.method, force=True))
    assert (again["steps"], again["resumed_from_step"]) == (4, 0), "--force trains every step, not 0 from the end"
