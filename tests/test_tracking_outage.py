"""Tracking never costs a run: an MLflow server killed mid-run leaves the run to finish with its adapter
and summary, and what MLflow did not record is kept beside the summary."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from flexi_workflows.pipeline import MLFLOW_MISSED, run_pipeline
from flexi_workflows.stages.train import RAY_RESULTS, REPORT
from tests.conftest import start_mlflow_server
from tests.helpers import small_recipe

pytestmark = pytest.mark.slow


def test_a_tracking_server_killed_mid_run_costs_nothing_but_the_record(tmp_path, tiny_model_dir, ray_local):
    server, url = start_mlflow_server(tmp_path / "mlflow")
    recipe = small_recipe(tmp_path, tiny_model_dir, method={"name": "lora", "rank": 4},
                          training={"max_steps": 6, "checkpoint_every": 2}, tracking={"enabled": True, "tracking_uri": url})

    def kill_when_training_starts() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not (tmp_path / "out" / RAY_RESULTS).exists():
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_training_starts, daemon=True)
    killer.start()
    started = time.time()
    try:
        summary = run_pipeline(recipe)
    finally:
        killer.join(timeout=5)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert server.poll() is not None, "the server was killed during the run"
    assert {r["method"] for r in summary["rows"]} == {"base", "lora-4"}
    out = tmp_path / "out"
    assert (out / "summary.json").is_file()
    train = next(out.glob("train/lora-4-*"))
    assert any(train.joinpath("artifact").iterdir()), "the trained adapter is there"
    report = json.loads((train / REPORT).read_text())
    assert report["steps"] == report["total_steps"] == 6
    missed = json.loads((out / MLFLOW_MISSED).read_text())
    assert missed["tracking_uri"] == url and missed["missed"]
    calls = {m["call"] for m in missed["missed"]}
    assert "end" in calls or "log_stage" in calls, calls  # the parent run's end and the stage records after the kill
    assert time.time() - started < 600
