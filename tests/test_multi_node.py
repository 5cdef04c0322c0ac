"""A run on a two-node Ray cluster on this machine, with its storage on a real S3-compatible server.

Ray's own test cluster (`ray.cluster_utils.Cluster`) starts two raylets with 2 CPUs each; a worker or
actor asking for 2 CPUs fits one per node, so the training workers and the evaluation actors have to
spread over both. Storage is SeaweedFS's S3 gateway on 127.0.0.1; MLflow is a tracking server process.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from flexi_workflows.errors import ConfigError
from flexi_workflows.stages.train import RANKS_USED, REPORT
from flexi_workflows.storage import Storage
from tests.conftest import free_port
from tests.helpers import small_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(s3_server):
    """Started after the S3 server: like a real cluster's nodes, they hold the storage credentials in their
    environment (AWS_* variables; an instance role on a cloud), which workers and actors inherit."""
    import ray
    from ray.cluster_utils import Cluster

    had_session_cluster = ray.is_initialized()
    if had_session_cluster:  # the session's one-node cluster (conftest.ray_local): this module needs its own
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    if had_session_cluster:  # back as conftest.ray_local left it, for the tests after this module
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=free_port(), log_to_driver=False)


def _recipe(tmp_path, model_dir, **sections):
    return small_recipe(tmp_path, model_dir, method={"name": "lora", "rank": 4},
                        distribution={"num_workers": 2, "cpus_per_worker": 2},
                        evaluation={"num_actors": 2, "cpus_per_actor": 2, "batch_size": 6, "include_base": False},
                        **sections)


def test_a_sqlite_store_is_refused_on_a_multi_node_cluster(tmp_path, tiny_model_dir, two_nodes):
    from flexi_workflows.pipeline import prepare

    recipe = _recipe(tmp_path, tiny_model_dir, tracking={"enabled": True})
    with pytest.raises(ConfigError, match=r"tracking.tracking_uri: sqlite:///.*2 nodes.*tracking.tracking_uri=http://"):
        prepare(recipe)


def _node_ids(actors, kind: str) -> set[str]:
    return {a.node_id for a in actors if kind in (a.class_name or "")}


def test_a_run_spreads_over_two_nodes_keeps_everything_in_s3_and_survives_a_worker_failure(
        tmp_path, tiny_model_dir, two_nodes, s3_server, mlflow_server, monkeypatch):
    from ray.util.state import list_actors

    from flexi_workflows.pipeline import run_pipeline

    marker = tmp_path / "failed-once"
    monkeypatch.setenv("FLEXI_TEST_FAIL_AT_STEP", f"6:{marker}")
    monkeypatch.setenv("FLEXI_STORAGE_CACHE", str(tmp_path / "node-cache"))
    uri = s3_server.replace("s3://flexi-test", f"s3://flexi-test/{tmp_path.name}")
    recipe = _recipe(tmp_path / "laptop", tiny_model_dir, storage=uri,
                     training={"epochs": 2, "checkpoint_every": 4, "max_failures": 1},
                     tracking={"enabled": True, "tracking_uri": mlflow_server, "experiment": "two-nodes"})
    summary = run_pipeline(recipe, quiet=True)
    assert marker.is_file(), "the injected worker failure fired"

    storage = Storage(uri)
    assert json.loads(storage.read_text("summary.json"))["rows"] == summary["rows"]
    assert {r["method"] for r in summary["rows"]} == {"lora-4"}
    train = next(s for name, s in summary["stages"].items() if name.startswith("train"))
    assert train["folder"].startswith("s3://flexi-test/")
    train_folder = train["folder"].split("flexi-test/", 1)[1].split("/", 1)[1]
    report = json.loads(storage.read_text(f"{train_folder}/{REPORT}"))
    assert report["steps"] == report["total_steps"] == 16
    assert report["resumed_from_step"] == 4, "the restarted workers resumed from the step-4 checkpoint in S3"
    assert [s for s, _ in report["loss_curve"]] == list(range(1, 17)), "the checkpoint's curve, then the rest"
    records = json.loads(storage.read_text(f"{train_folder}/{RANKS_USED}"))
    assert sorted((r["step"], r["worker"], r["micro_batch"], r["rank"]) for r in records) == \
        [(step, worker, 0, 4) for step in range(16) for worker in (0, 1)], \
        "the rank record keeps what the checkpoint held and goes on from there, each micro-batch once"
    assert report["checkpoint"].startswith(f"flexi-test/{tmp_path.name}/ray_results/")
    assert storage.exists("ray_results")
    # the driver's output folder: nothing of the run (the tracking store is the server)
    out = tmp_path / "laptop" / "out"
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], sorted(out.rglob("*"))

    import ray

    actors = list_actors(address=two_nodes.address, detail=True, limit=10_000, raise_on_missing_output=False)
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert _node_ids(actors, "RayTrainWorker") == nodes, "training workers on both nodes"
    assert _node_ids(actors, "MapWorker") == nodes, "evaluation actors on both nodes"

    # rank 0 (on whichever node) logged its per-step curves to the tracking server
    def rest(path, body):
        req = urllib.request.Request(mlflow_server + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req).read())

    exp = json.loads(urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=two-nodes").read())
    runs = rest("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment"]["experiment_id"]],
                                                 "filter": "tags.`flexi.stage` = 'train'"})["runs"]
    assert len(runs) == 1
    history = json.loads(urllib.request.urlopen(
        f"{mlflow_server}/api/2.0/mlflow/metrics/get-history?run_id={runs[0]['info']['run_id']}&metric_key=tokens_per_s").read())
    assert len(history["metrics"]) >= 16, "every step's throughput, logged by the training worker"


def test_a_sweep_on_two_nodes_keeps_its_trial_records_and_tune_state_in_s3_and_resumes_from_there(
        tmp_path, tiny_model_dir, two_nodes, s3_server, monkeypatch):
    """Trials run on any node: with `storage: s3://...` they write their records and summaries, and Tune its
    state, to storage (sweeps/<fingerprint>/), not to the driver's output folder; the driver copies the
    records back for the report, and a rerun restores Tune's state from S3 and runs nothing again."""
    from flexi_workflows.sweep.run import run_sweep

    monkeypatch.setenv("FLEXI_STORAGE_CACHE", str(tmp_path / "node-cache"))
    uri = s3_server.replace("s3://flexi-test", f"s3://flexi-test/{tmp_path.name}")
    # one worker and one eval actor of 2 CPUs per trial: two trials fit the two nodes at once
    recipe = small_recipe(tmp_path / "laptop", tiny_model_dir, method={"name": "lora", "rank": 4}, storage=uri,
                          training={"max_steps": 2}, distribution={"num_workers": 1, "cpus_per_worker": 2},
                          evaluation={"num_actors": 1, "cpus_per_actor": 2, "batch_size": 6, "include_base": False},
                          sweep={"space": {"seed": [0, 1]}, "metric": "accuracy_all", "max_concurrent_trials": 2})
    state = run_sweep(recipe)
    assert state["finished"] == 2 and state["failed"] == 0

    storage = Storage(uri)
    home = f"sweeps/{state['fingerprint']}"
    ids = [t["trial_id"] for t in state["trials"]]
    records = {}
    for trial_id in ids:
        record = records[trial_id] = json.loads(storage.read_text(f"{home}/trials/{trial_id}.json"))
        assert record["status"] == "FINISHED"
        assert storage.exists(f"{home}/trials/{trial_id}/summary.json"), "the trial's summary, written from its node"
    from ray import tune

    experiment = storage.path(f"{home}/tune/sweep-{state['fingerprint']}")
    assert tune.Tuner.can_restore(experiment, storage_filesystem=storage.fs), "Tune's experiment state in S3"
    sweep_dir = tmp_path / "laptop" / "out"
    assert not (sweep_dir / "tune").exists()
    # the driver's copies, which the report reads
    assert {p.stem for p in (sweep_dir / "trials").glob("*.json")} == set(ids)
    assert json.loads((sweep_dir / "report" / "report.json").read_text())["trials"] == 2

    rerun = run_sweep(recipe)  # Tune restores the finished experiment from S3 (can_restore above)
    assert rerun["finished"] == 2
    for trial_id in ids:  # and no trial was computed again: each record is as the first run wrote it
        assert json.loads(storage.read_text(f"{home}/trials/{trial_id}.json")) == records[trial_id]
