"""A real sweep: Ray Tune on the session's local Ray cluster, an MLflow server, a tiny LLaMA.

2 rank pairs × 2 router σ, 2 trials at once; one trial forced to fail. The sweep is first run as
`flexi sweep` in a process of its own and killed once a trial has finished, then resumed; the
finished trial is not run again, the stages trials share ran once, and `flexi report` agrees with
the trials' own metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flexi_workflows.cli import main
from flexi_workflows.placement_groups import train_groups
from flexi_workflows.recipes import load_recipe
from tests.conftest import REPO_ROOT
from tests.helpers import record_scores, small_recipe_data

pytestmark = pytest.mark.slow
FAILING = "method.ranks=[1, 8];router.noise_std=0.3"


def _rest(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _write_recipe(tmp_path: Path, model_dir: Path, tracking_uri: str) -> Path:
    recipe = small_recipe_data(
        tmp_path, model_dir, name="sweep-test", output_dir=str(tmp_path / "sweep"),
        training={"max_steps": 3}, evaluation={"include_base": False},
        tracking={"enabled": True, "tracking_uri": tracking_uri, "experiment": "sweep-test"},
        sweep={"space": {"method.ranks": [[1, 8], [2, 8]], "router.noise_std": [0.0, 0.3]},
               "metric": "accuracy_all", "max_concurrent_trials": 2},
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _assert_cpus_come_back(ray, cpus: float = 2.0, within: float = 90.0) -> None:
    """A stopped or killed trial must not keep its training workers' placement group (and CPUs)."""
    deadline = time.time() + within
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= cpus:
            return
        time.sleep(2)
    raise AssertionError(f"CPUs still held after {within:.0f} s: {ray.available_resources()}")


def _records(sweep_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (sweep_dir / "trials").glob("*.json")}


def test_sweep_shares_stages_records_failures_resumes_and_reports(tmp_path, tiny_model_dir, ray_local, mlflow_server,
                                                                   monkeypatch):
    path = _write_recipe(tmp_path, tiny_model_dir, mlflow_server)
    sweep_dir = tmp_path / "sweep"
    record_scores(load_recipe(path))  # known easy/hard classes; a random tiny model gets every row wrong

    # 1. `flexi sweep` in its own process (joined to this session's cluster), killed after a trial finished
    gcs = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "FLEXI_TEST_FAIL_TRIAL": FAILING}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "flexi"), "sweep", str(path), f"ray.address={gcs}"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if any(r.get("status") == "FINISHED" for r in _records(sweep_dir).values()):
            break
        time.sleep(1)
    assert proc.poll() is None, "the sweep was still running when a first trial finished"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    done_before = {k: r for k, r in _records(sweep_dir).items() if r["status"] == "FINISHED"}
    assert done_before
    record_mtimes = {k: (sweep_dir / "trials" / f"{k}.json").stat().st_mtime_ns for k in done_before}
    time.sleep(5)  # let Ray reap the killed driver's trials before the resume starts new ones

    _assert_cpus_come_back(ray_local)  # the killed driver's trials released their workers

    # 2. the same command again resumes: finished trials are not run again
    monkeypatch.setenv("FLEXI_TEST_FAIL_TRIAL", FAILING)
    assert main(["sweep", str(path)]) == 0
    records = _records(sweep_dir)
    assert len(records) == 4
    for k in done_before:
        assert (sweep_dir / "trials" / f"{k}.json").stat().st_mtime_ns == record_mtimes[k], f"{k} was run again"
    failed = [r for r in records.values() if r["status"] == "FAILED"]
    assert len(failed) == 1 and "injected failure" in failed[0]["error"]
    assert failed[0]["overrides"] == {"method.ranks": [1, 8], "router.noise_std": 0.3}
    finished = [r for r in records.values() if r["status"] == "FINISHED"]
    assert len(finished) == 3

    # stages, counted from their records: scoring once, the router once per σ, one train per trial
    assert len(list((sweep_dir / "score").glob("*/manifest.json"))) == 1
    assert len(list((sweep_dir / "route").glob("*/manifest.json"))) == 2
    trains = [r["summary"]["stages"][f"train:{r['summary']['rows'][0]['method']}"]["folder"] for r in finished]
    assert len(set(trains)) == 3, "concurrent trials never share an output folder"
    assert len(list((sweep_dir / "train").glob("*/manifest.json"))) == 3

    # 3. MLflow: one sweep run, a nested run per trial with its overrides, metrics and status, the best tagged
    exp = json.loads(urllib.request.urlopen(
        f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=sweep-test").read())["experiment"]
    runs = _rest(mlflow_server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 500})["runs"]
    sweeps = [r for r in runs if _tags(r).get("flexi.kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0]["info"]["status"] == "FINISHED"
    parent = sweeps[0]["info"]["run_id"]
    trial_runs = [r for r in runs if _tags(r).get("mlflow.parentRunId") == parent and _tags(r).get("flexi.kind") == "trial"]
    assert len(trial_runs) == 4
    assert sorted(r["info"]["status"] for r in trial_runs) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    by_trial = {_tags(r)["flexi.trial_id"]: r for r in trial_runs}
    for trial_id, record in records.items():
        params = {p["key"]: p["value"] for p in by_trial[trial_id]["data"].get("params", [])}
        assert json.loads(params["method.ranks"]) == record["overrides"]["method.ranks"]
        assert float(params["router.noise_std"]) == record["overrides"]["router.noise_std"]
    metrics = {k: {m["key"]: m["value"] for m in by_trial[k]["data"].get("metrics", [])} for k in by_trial}
    for record in finished:
        m = metrics[record["trial_id"]]
        assert {"accuracy_all", "mean_active_params", "trainable_params", "params_pct_of_lora8"} <= set(m)
    best = [k for k, r in by_trial.items() if _tags(r).get("flexi.best") == "true"]
    assert len(best) == 1
    assert metrics[best[0]]["accuracy_all"] == max(metrics[r["trial_id"]]["accuracy_all"] for r in finished)
    assert _tags(sweeps[0])["flexi.best_trial"] == best[0]
    # every stage computed exactly once across the interrupted and the resumed sweep (the rest reused)
    computed = {}
    for r in runs:
        tags = _tags(r)
        if tags.get("flexi.cached") == "false":
            computed.setdefault(tags["flexi.stage"], []).append(tags["flexi.fingerprint"])
    assert "score" not in computed, "the recorded scores were found, never recomputed"
    assert sorted(computed) == ["eval", "route", "train"]
    assert len(computed["route"]) == len(set(computed["route"])) == 2, "one router per σ"
    assert len(computed["train"]) == len(set(computed["train"])) == 3
    assert len(computed["eval"]) == len(set(computed["eval"])) == 3

    # 4. `flexi report`: means and stds from the trials' own metrics, valid images
    assert main(["report", str(sweep_dir)]) == 0
    report = json.loads((sweep_dir / "report" / "report.json").read_text())
    rows = {(r["method"], r["noise_std"]): r for r in report["rows"]}
    assert len(rows) == 3
    for record in finished:
        label = f"flexi-{'-'.join(map(str, record['overrides']['method.ranks']))}"
        row = rows[(label, record["overrides"]["router.noise_std"])]
        m = metrics[record["trial_id"]]
        assert row["seeds"] == 1
        assert row["accuracy_all_mean"] == pytest.approx(m["accuracy_all"])
        assert row["mean_active_params_mean"] == pytest.approx(m["mean_active_params"])
        assert row["accuracy_all_std"] == 0.0
    assert [f["trial_id"] for f in report["failed_trials"]] == [failed[0]["trial_id"]]
    import matplotlib.image

    for name in ("pareto.png", "rank_shares.png", "metric_vs_noise.png"):
        png = sweep_dir / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(png).size > 0

    # 5. a result-neutral change to a trial's recipe reuses every one of its stages
    from flexi_workflows.pipeline import run_pipeline

    record = finished[0]
    overrides = [f"{k}={json.dumps(v)}" for k, v in record["overrides"].items()]
    neutral = load_recipe(path, overrides + ["scoring.num_actors=2", "training.log_every=2", "evaluation.num_actors=2",
                                             "distribution.torch_threads=1", "tracking.enabled=false", "sweep=null"])
    summary = run_pipeline(neutral, summary_dir=tmp_path / "neutral", quiet=True)
    assert summary["stages"] and all(s["cached"] for s in summary["stages"].values())
    assert {s["folder"] for s in summary["stages"].values()} == {s["folder"] for s in record["summary"]["stages"].values()}


def test_asha_stops_a_weak_trial_on_its_validation_loss(tmp_path, tiny_model_dir, ray_local):
    """One trial at a time: the first always goes on; the second, with a learning rate too small to
    learn, has a worse val_loss after epoch 1 and is stopped there."""
    recipe = small_recipe_data(
        tmp_path, tiny_model_dir, name="asha", output_dir=str(tmp_path / "asha"), method={"name": "lora", "rank": 4},
        training={"epochs": 3, "validation_rows": 16}, evaluation={"include_base": False},
        sweep={"space": {"training.lr": [0.01, 1e-7]}, "metric": "accuracy_all", "max_concurrent_trials": 1,
               "scheduler": {"grace_period": 1, "reduction_factor": 2}},
    )
    path = tmp_path / "asha.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["sweep", str(path)]) == 0
    records = {r["overrides"]["training.lr"]: r for r in _records(tmp_path / "asha").values()}
    assert records[0.01]["status"] == "FINISHED"
    assert records[1e-7]["status"] == "STOPPED" and "epoch 1" in records[1e-7]["error"]
    train = next(s for name, s in records[0.01]["summary"]["stages"].items() if name.startswith("train:"))
    report = json.loads((Path(train["folder"]) / "train_report.json").read_text())
    assert [step for step, _ in report["val_loss_curve"]] == [12, 24, 36], "one val_loss per epoch (48 rows / 4)"
    assert report["validation_rows"] == 16 and report["steps"] == 36
    assert records[1e-7]["val_loss"] > report["val_loss_curve"][0][1]
    state = json.loads((tmp_path / "asha" / "sweep.json").read_text())
    assert state["stopped"] == 1 and state["finished"] == 1
    assert state["orphaned_train_groups_removed"] in (0, 1)  # 1 when the stopped trial's controller died mid-abort
    assert train_groups() == []  # the stopped trial's placement group is gone, by Ray Train or by the sweep
    _assert_cpus_come_back(ray_local)  # the stopped trial's training workers are gone


def test_asha_without_validation_rows_is_refused(tmp_path, tiny_model_dir, capsys):
    recipe = small_recipe_data(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "asha"),
                               sweep={"space": {"training.lr": [0.01, 0.001]}, "metric": "accuracy_all",
                                      "scheduler": {"grace_period": 1}})
    path = tmp_path / "asha.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["sweep", str(path)]) == 2
    assert "set training.validation_rows" in capsys.readouterr().err
    assert not (tmp_path / "asha").exists()
