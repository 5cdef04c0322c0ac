"""Relative paths in a recipe become absolute before any stage runs: Ray workers and Tune trials run in
other working directories. Fingerprints stay the same (data and models count by content)."""

from __future__ import annotations

import shutil
from pathlib import Path

from flexi_workflows.pipeline import prepare
from flexi_workflows.stages.plan import plan_pipeline
from tests.helpers import small_recipe


def test_prepare_makes_local_paths_absolute_without_moving_fingerprints(tmp_path, tiny_model_dir, monkeypatch):
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    absolute = small_recipe(tmp_path, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    relative = small_recipe(Path("."), Path("model"), output_dir="out")
    assert relative.task.train.path == "train.jsonl" and relative.model.name_or_path == "model"
    prepared = prepare(relative)
    assert prepared.output_dir == str(tmp_path / "out")
    assert prepared.task.train.path == str(tmp_path / "train.jsonl")
    assert prepared.task.eval[0].path == str(tmp_path / "eval.jsonl")
    assert prepared.model.name_or_path == str(tmp_path / "model")
    assert [s.fingerprint for s in plan_pipeline(prepared).stages()] == \
           [s.fingerprint for s in plan_pipeline(absolute).stages()]
