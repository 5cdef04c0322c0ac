"""MLflow tracking and evaluation during training, without a pipeline run: git tags, recipe checks on the new
keys, the choice of the best checkpoint, a sqlite store opened by several processes, and what a tracker saves
while its server is away (to a local folder or to S3 storage). The MLflow server side is checked in
tests/test_pipeline.py."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from flexi_workflows.errors import ConfigError
from flexi_workflows.stages.train import best_checkpoint
from flexi_workflows.tracking import Tracker, code_tags, git_tags
from tests.helpers import small_recipe


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_git_tags_name_the_commit_and_whether_the_checkout_was_dirty(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    code = repo / "code.py"
    code.write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "code.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert git_tags(code) == {"mlflow.source.git.commit": head, "flexi.git_commit": head, "flexi.git_dirty": "false"}
    code.write_text("x = 2\n")
    assert git_tags(code)["flexi.git_dirty"] == "true"
    # a file the checkout does not track (an installed copy below some checkout's folder): no claim
    (repo / "installed.py").write_text("")
    assert git_tags(repo / "installed.py") == {}
    assert git_tags(tmp_path) == {}, "not a checkout: no tags, no error"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert git_tags(code) == {}, "no git on PATH: no tags, no error"


def test_this_checkout_tags_its_commit():
    tags = code_tags()  # the tests run from a git checkout of the project
    assert len(tags["flexi.git_commit"]) == 40 and tags["flexi.git_dirty"] in ("true", "false")


@pytest.mark.parametrize("overrides,message", [
    (["training.eval_every=2"], r"training.eval_every=2 measures the held-out loss: set training.validation_rows"),
    (["training.final_artifact=best"], r"training.final_artifact=best measures the held-out loss"),
    (["training.eval_every=-1", "training.validation_rows=4"], r"training.eval_every must be ≥ 0"),
    (["training.final_artifact=first"], r"training.final_artifact must be one of"),
    (["tracking.register_as= "], r"tracking.register_as must be a model name"),
    (["tracking.system_metrics_interval=-1"], r"tracking.system_metrics_interval must be ≥ 0"),
])
def test_bad_training_and_tracking_keys_are_named(tmp_path, tiny_model_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        small_recipe(tmp_path, tiny_model_dir, overrides=overrides)


def test_best_checkpoint_is_the_lowest_measured_val_loss_the_earliest_of_equals():
    kept = [("a", {"step": 2, "val_score": 1.5}), ("b", {"step": 4, "val_score": 1.2}),
            ("c", {"step": 6, "val_score": 1.2}), ("d", {"step": 8, "val_score": math.inf})]
    assert best_checkpoint(kept) == ("b", {"step": 4, "val_score": 1.2})
    with pytest.raises(RuntimeError, match="no checkpoint with a held-out loss"):
        best_checkpoint([("d", {"step": 8, "val_score": math.inf})])


def test_a_dataset_read_in_several_stages_is_one_input_with_every_context():
    from flexi_workflows.pipeline import merge_datasets

    train = {"name": "train", "uri": "/d/train.jsonl", "hub_name": None, "digest": "a1"}
    merged = merge_datasets([{**train, "context": "scoring"}, {**train, "context": "training"},
                             {**train, "context": "training"}, {**train, "digest": "b2", "context": "training"}])
    assert [(d["digest"], d["context"]) for d in merged] == [("a1", "scoring, training"), ("b2", "training")]


def test_runs_left_running_by_a_gone_process_are_closed_as_killed(tmp_path):
    from flexi_workflows.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "abandoned")
    mine = tracker.start_run("alive")  # owned by this process: stays RUNNING
    orphan = tracker.start_run("orphan")
    tracker.set_tags(orphan, {"flexi.pid": "999999999", "flexi.pid_started": "1.0"})  # a process that is gone
    assert tracker.close_abandoned() == [orphan]
    assert tracker.client.get_run(orphan).info.status == "KILLED"
    assert tracker.client.get_run(mine).info.status == "RUNNING"


def test_a_tracker_whose_server_is_away_records_instead_of_raising(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flexi_workflows.tracking import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "away")
    run = tracker.start_run("run")
    tracker.client = MlflowClient("http://127.0.0.1:9")  # nothing listens there: as a server that died
    tracker.log_metrics(run, {"accuracy": 0.5}, step=3)
    tracker.end(run, "FINISHED")  # within RETRY_S of the failure: recorded without trying
    tracker.log_metrics(None, {"loss": 1.0})  # a run that could not be started
    assert [m["call"] for m in tracker.missed] == ["log_metrics", "end", "log_metrics"]
    assert tracker.missed[0]["error"] and tracker.missed[1]["error"] is None
    assert tracker.missed[0]["args"] == [run, {"accuracy": 0.5}, {"step": 3}]
    tracker.save_missed(tmp_path / "mlflow_missed.json")
    saved = json.loads((tmp_path / "mlflow_missed.json").read_text())
    assert saved["tracking_uri"].startswith("sqlite:///") and len(saved["missed"]) == 3


def _open_store(uri: str, queue) -> None:
    try:
        queue.put(Tracker(uri, "race").experiment_id)
    except Exception as exc:  # noqa: BLE001 — reported to the test
        queue.put(f"{type(exc).__name__}: {exc}")


def test_processes_creating_one_sqlite_store_at_once_all_get_it(tmp_path):
    """Sweep trials (or two runs sharing a tracking_uri) start together on a new store: MLflow's table
    creation raced ("table experiments already exists") and crashed a run."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    procs = [context.Process(target=_open_store, args=(uri, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    ids = [queue.get(timeout=5) for _ in procs]
    assert len(set(ids)) == 1 and str(ids[0]).isdigit(), ids


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_missed_calls_are_saved_beside_the_summary_in_a_local_folder_or_in_storage(tmp_path, kind, request):
    """A sweep trial's summary folder may be in S3 storage: what MLflow missed is written there too."""
    from flexi_workflows.pipeline import MLFLOW_MISSED, save_missed
    from flexi_workflows.storage import Storage
    from flexi_workflows.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "away")
    tracker.log_metrics(None, {"loss": 1.0})  # a run that could not be started: recorded as missed, nothing sent
    if kind == "local":
        folder = str(tmp_path / "trial")
        (tmp_path / "trial").mkdir()
    else:
        folder = request.getfixturevalue("s3_server").replace("s3://flexi-test", f"s3://flexi-test/{tmp_path.name}/trial")
    where = save_missed(tracker, folder)
    saved = json.loads(Storage(folder).read_text(MLFLOW_MISSED))
    assert [m["call"] for m in saved["missed"]] == ["log_metrics"]
    assert where == Storage(folder).display(MLFLOW_MISSED)
    assert "?" not in where  # an endpoint in the URI's query stays out of the log line
