"""The pipeline end to end: a real MLflow server, reruns that skip finished stages, and config changes
that redo only what depends on them."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from flexi_workflows.pipeline import SUMMARY, run_pipeline
from tests.conftest import free_port
from tests.helpers import record_scores, small_recipe

pytestmark = pytest.mark.slow


def _rest(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.parent.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("manifest.json")
            if "ray_results" not in p.parts}


def test_pipeline_tracks_to_mlflow_server_and_reruns_only_what_changed(tmp_path, tiny_model_dir, ray_local, mlflow_server):
    sections = dict(method={"name": "lora", "rank": 4},
                    compare=[{"name": "flexi", "ranks": [2, 8], "dropout": 0.0}],
                    training={"max_steps": 3},
                    tracking={"enabled": True, "tracking_uri": mlflow_server, "experiment": "pipeline-test",
                              "register_as": "pipeline-test-adapter"})
    recipe = small_recipe(tmp_path, tiny_model_dir, **sections)
    record_scores(recipe)  # known difficulty classes; the pipeline's score stage finds them up to date
    summary = run_pipeline(recipe)
    out = Path(recipe.output_dir)
    assert json.loads((out / SUMMARY).read_text()) == summary
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"base", "lora-4", "flexi-2-8"}
    assert rows["base"]["mean_active_params"] == 0
    assert rows["lora-4"]["params_pct_of_lora8"] == pytest.approx(50.0)
    assert 0 <= rows["flexi-2-8"]["high_rank_rate"] <= 1
    # evaluated at the ranks they were trained with: LoRA at 4, Flexi at 2 or 8 per input, and Flexi's mean
    # active parameters are one rank's parameters times its mean rank
    assert rows["lora-4"]["mean_rank"] == 4 and set(rows["flexi-2-8"]["rank_shares"]) <= {"2", "8"}
    per_rank = rows["lora-4"]["mean_active_params"] / 4
    assert rows["flexi-2-8"]["mean_active_params"] == pytest.approx(per_rank * rows["flexi-2-8"]["mean_rank"])
    assert (out / "pareto.png").is_file()

    # MLflow, read back over REST: one pipeline parent with the recipe as params, children per stage/method
    exp = json.loads(urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=pipeline-test").read())
    runs = _rest(mlflow_server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment"]["experiment_id"]]})["runs"]
    by_name = {r["info"]["run_name"]: r for r in runs}
    assert {"test", "score", "route", "eval:base", "train:lora-4", "eval:lora-4", "train:flexi-2-8", "eval:flexi-2-8"} <= set(by_name)
    parent = by_name["test"]
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["method.name"] == "lora" and params["training.max_steps"] == "3"
    parent_id = parent["info"]["run_id"]
    for name in ("train:lora-4", "eval:flexi-2-8", "route"):
        tags = {t["key"]: t["value"] for t in by_name[name]["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == parent_id
    eval_metrics = {m["key"]: m["value"] for m in by_name["eval:flexi-2-8"]["data"]["metrics"]}
    assert {"mini.accuracy", "mini.mean_active_params", "mini.high_rank_rate", "params_per_rank", "base_params"} <= set(eval_metrics)
    train_metrics = {m["key"]: m["value"] for m in by_name["train:lora-4"]["data"]["metrics"]}
    assert train_metrics["trainable_params"] > 0 and "loss" in train_metrics and "tokens_per_s" in train_metrics
    assert by_name["eval:lora-4"]["info"]["status"] == "FINISHED"
    _check_mlflow_record(mlflow_server, by_name, out)

    # rerun, same inputs: nothing is redone, and the new parent run still shows every stage's results
    before = _mtimes(out)
    run_pipeline(recipe)
    assert _mtimes(out) == before
    runs = _rest(mlflow_server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment"]["experiment_id"]]})["runs"]
    parents = sorted((r for r in runs if r["info"]["run_name"] == "test"), key=lambda r: r["info"]["start_time"])
    rerun_id = parents[-1]["info"]["run_id"]
    children = {r["info"]["run_name"]: r for r in runs
                if {t["key"]: t["value"] for t in r["data"]["tags"]}.get("mlflow.parentRunId") == rerun_id}
    assert set(children) == {"score", "route", "eval:base", "train:lora-4", "eval:lora-4", "train:flexi-2-8", "eval:flexi-2-8"}
    cached = {t["key"]: t["value"] for t in children["eval:flexi-2-8"]["data"]["tags"]}
    assert cached["flexi.cached"] == "true"
    rerun_metrics = {m["key"]: m["value"] for m in children["eval:flexi-2-8"]["data"]["metrics"]}
    assert rerun_metrics["mini.accuracy"] == eval_metrics["mini.accuracy"], "a reused stage logs its recorded results"
    assert "loss" in {m["key"] for m in children["train:lora-4"]["data"]["metrics"]}, "the loss curve, from the record"
    _check_rerun_links(mlflow_server, by_name, children)

    # a new router σ computes a new router and what depends on it — not scoring, not the LoRA baseline
    changed = small_recipe(tmp_path, tiny_model_dir, overrides=["router.noise_std=0.5"], **sections)
    run_pipeline(changed)
    after = _mtimes(out)
    assert all(after[k] == v for k, v in before.items()), "earlier results are kept, untouched"
    new = {k.rsplit("-", 1)[0] if "/" in k and "-" in k.split("/")[1] else k.split("/")[0] for k in set(after) - set(before)}
    assert new == {"route", "train/flexi-2-8", "eval/flexi-2-8"}


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"]["tags"]}


def _check_mlflow_record(url: str, by_name: dict, out: Path) -> None:
    """What a practitioner finds in MLflow after one run: the code's commit, the recipe's hash, the data
    read, the training workers' system metrics, and the trained adapter as a registered model."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    parent, train = by_name["test"], by_name["train:lora-4"]
    for run in (parent, train):  # the tests run from a git checkout of the project
        assert len(_tags(run)["flexi.git_commit"]) == 40 and _tags(run)["flexi.git_dirty"] in ("true", "false")
        assert _tags(run)["mlflow.source.git.commit"] == _tags(run)["flexi.git_commit"]
    assert len(_tags(parent)["flexi.recipe_hash"]) == 16
    # system metrics, sampled on the training worker's node (MLflow's monitor, by run id)
    train_keys = {m["key"] for m in train["data"]["metrics"]}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= train_keys
    # input datasets: where the data lies and the digest of the rows used
    inputs = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]): d.dataset
              for d in client.get_run(train["info"]["run_id"]).inputs.dataset_inputs}
    assert set(inputs) == {("train", "training")}
    assert json.loads(inputs["train", "training"].source)["uri"].endswith("train.jsonl")
    parent_inputs = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
                     for d in client.get_run(parent["info"]["run_id"]).inputs.dataset_inputs}
    assert parent_inputs == {("train", "scoring, training"), ("mini", "evaluation")}, "each dataset once, every use"
    # the trained adapter: a logged model of the train run, registered as version 1
    model_id = _tags(train)["flexi.model_id"]
    assert _tags(train)["flexi.registered_model"] == "models:/pipeline-test-adapter/1"
    versions = client.search_model_versions("name = 'pipeline-test-adapter'")
    assert [(v.version, v.tags["flexi.method"]) for v in versions] == [("1", "lora-4")]
    assert "flexi.model_id" in _tags(by_name["train:flexi-2-8"]), "every trained method is a logged model"
    source = client.get_model_version_download_uri("pipeline-test-adapter", "1")  # the registry on this server
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=url))
    artifact = next(out.glob("train/lora-4-*/artifact"))
    files = sorted(p.relative_to(artifact) for p in artifact.rglob("*") if p.is_file())
    assert files and sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file()) == files
    assert all((local / f).read_bytes() == (artifact / f).read_bytes() for f in files)
    assert client.get_logged_model(model_id).source_run_id == train["info"]["run_id"]


def _check_rerun_links(url: str, first: dict, children: dict) -> None:
    """A reused stage's run points at the run that computed and uploaded its artifacts; nothing is
    registered or logged again."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    train = children["train:lora-4"]
    assert _tags(train)["flexi.computed_by_run"] == first["train:lora-4"]["info"]["run_id"]
    assert _tags(train)["flexi.model_id"] == _tags(first["train:lora-4"])["flexi.model_id"]
    link = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=train["info"]["run_id"], artifact_path="cached_stage.json",
                                                               tracking_uri=url)).read_text())
    assert link["computed_by_run"] == first["train:lora-4"]["info"]["run_id"] and "train_report.json" in link["artifacts"]
    assert link["computed_by_artifact_uri"] == client.get_run(link["computed_by_run"]).info.artifact_uri
    assert [v.version for v in client.search_model_versions("name = 'pipeline-test-adapter'")] == ["1"]


def test_unreachable_tracking_server_fails_before_any_work(tmp_path, tiny_model_dir):
    from flexi_workflows.errors import ConfigError

    recipe = small_recipe(tmp_path, tiny_model_dir, tracking={"enabled": True, "tracking_uri": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(ConfigError, match="cannot be reached"):
        run_pipeline(recipe)
    assert not (tmp_path / "out").exists()
