"""The README's `ray job submit` path, verbatim: the commands of its "Running on a cluster" block — start a Ray
head and an MLflow server from the project's environment, submit a recipe as a Ray job, stop both — run
exactly as written from a newcomer's shell, plus a sweep submitted through the same entry point and a job
stopped with `ray job stop`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def readme_cluster_commands() -> list[str]:
    """The shell lines of the README's first bash block under "## Running on a cluster", comments dropped."""
    section = (REPO_ROOT / "README.md").read_text().split("\n## Running on a cluster\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


# a newcomer's shell: what a login gives, no virtualenv on PATH, no Ray address or auth mode (nothing this test
# session's own Ray, S3 or MLflow set-up put into its environment)
NEWCOMER = ("HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "TERM", "TMPDIR")


def _shell(command: str, env: dict, timeout: int) -> subprocess.CompletedProcess:
    """`bash -c command` in the checkout; on timeout its whole process group goes (`ray job submit | tee`)."""
    process = subprocess.Popen(["bash", "-c", command], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{command!r} ran over {timeout} s:\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.mark.timeout(1800)
def test_the_readme_cluster_block_starts_a_head_submits_a_recipe_and_stops(tmp_path):
    commands = readme_cluster_commands()
    assert commands == ["bash scripts/local-cluster.sh start", "bash scripts/local-cluster.sh submit jobs/own-data.yaml",
                        "bash scripts/local-cluster.sh stop"]
    start, submit, stop = commands
    env = {k: os.environ[k] for k in NEWCOMER if k in os.environ}
    env["PATH"] = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != BIN)
    state = REPO_ROOT / ".local-cluster"
    if (state / "env").exists():
        pytest.skip("a local cluster from scripts/local-cluster.sh is already running in this checkout")
    out = REPO_ROOT / "outputs" / "own-data"  # where the job's results land, as `flexi run jobs/own-data.yaml`'s do
    kept = out.with_name(f"own-data.kept-by-{tmp_path.name}")  # a user's own earlier results, put back after
    if out.exists():
        out.rename(kept)
    try:
        started = _shell(start, env, timeout=300)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        try:
            _submit_then_sweep(submit, env, out, state, tmp_path)
            _a_stopped_job_ends_as_a_sigterm_does(env, state, tmp_path, finished=out)
        finally:
            stopped = _shell(stop, env, timeout=180)
        assert stopped.returncode == 0, stopped.stderr
        assert not (state / "env").exists()
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if kept.exists():
            kept.rename(out)


def _submit_then_sweep(submit: str, env: dict, out: Path, state: Path, tmp_path: Path) -> None:
    uri = dict(line.split("=", 1) for line in (state / "env").read_text().split())["MLFLOW_URI"]
    done = _shell(submit, env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    assert "acc all" in done.stdout and "flexi-2-8" in done.stdout  # the comparison table, in the job's log
    # Ray Train's placement-group cleaner asks this head's state API, even with other clusters on the machine
    assert "multiple active Ray instances" not in done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"base", "lora-8", "flexi-2-8"}
    assert rows["flexi-2-8"]["mean_active_params"] < rows["lora-8"]["mean_active_params"]
    assert not (out / "mlflow.db").exists(), "tracked to the cluster's server, not to a sqlite file beside the driver"
    # on the cluster's MLflow server: the job's pipeline run and a run per stage
    names = {r["info"]["run_name"] for r in _mlflow_runs(uri, "flexi-workflows")}
    assert {"own-data", "score", "route", "train:lora-8", "train:flexi-2-8", "eval:flexi-2-8"} <= names, names

    # `submit sweep RECIPE` (README): the same entry point runs a sweep; here the recipe over one seed, whose
    # one trial is the job above, found finished (every stage reused)
    recipe = yaml.safe_load((REPO_ROOT / "jobs" / "own-data.yaml").read_text())
    assert "sweep" not in recipe
    recipe["sweep"] = {"space": {"seed": [0]}, "metric": "accuracy_all"}
    sweep_path = tmp_path / "own-data-sweep.yaml"
    sweep_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    done = _shell(f"bash scripts/local-cluster.sh submit sweep {sweep_path}", env, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["finished"] == 1 and sweep["failed"] == 0
    assert (out / "report" / "report.json").is_file()
    (trial,) = sweep["trials"]
    stages = json.loads((out / "trials" / f"{trial['trial_id']}.json").read_text())["summary"]["stages"]
    assert stages and all(stage["cached"] for stage in stages.values()), stages


def _a_stopped_job_ends_as_a_sigterm_does(env: dict, state: Path, tmp_path: Path, finished: Path) -> None:
    """`ray job stop` sends the driver SIGTERM and SIGKILLs it RAY_JOB_STOP_WAIT_TIME_S later (Ray's 3 s; the
    script's head sets 30, as over 3 s was seen under load): a job stopped mid-training says what is kept, its MLflow
    runs end KILLED, and Ray saw it end before the SIGKILL. The job's output folder starts with the stages before
    training that the submitted job above finished (`finished`), as a rerun would find them: it reaches training
    without scoring and evaluating again."""
    stopped = tmp_path / "stopped"
    for kind in ("score", "route", "eval"):
        for folder in (finished / kind).glob("[!.]*" if kind != "eval" else "base-*"):  # not the lock files
            if folder.is_dir():
                shutil.copytree(folder, stopped / kind / folder.name)
    cluster = dict(line.split("=", 1) for line in (state / "env").read_text().split())
    experiment = f"stopped-job-{uuid.uuid4().hex[:8]}"  # the server's store outlives a cluster: an experiment of its own
    ray_env = {**env, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    ray = [str(REPO_ROOT / ".venv" / "bin" / "ray"), "job"]
    address = ["--address", cluster["RAY_DASHBOARD"]]

    def ray_job(verb: str, *args: str, timeout: int = 120) -> str:
        done = subprocess.run([*ray, verb, *address, *args], check=False, cwd=REPO_ROOT, env=ray_env,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout + done.stderr  # Ray's CLI says some of it on stderr (a stopped job's status)

    submitted = ray_job("submit", "--no-wait", "--working-dir", ".", "--", "python", "jobs/run.py",
                        "jobs/own-data.yaml", f"output_dir={stopped}",
                        f"tracking.tracking_uri={cluster['MLFLOW_URI']}", f"tracking.experiment={experiment}")
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submitted).group(0)
    deadline = time.monotonic() + 300
    while "train:lora-8 ─" not in ray_job("logs", job_id):  # mid-training: the stop Ray Train has to survive
        assert time.monotonic() < deadline and "RUNNING" in ray_job("status", job_id), ray_job("logs", job_id)[-3000:]
        time.sleep(2)
    time.sleep(5)
    ray_job("stop", job_id)
    assert f"Job '{job_id}' was stopped" in ray_job("status", job_id)
    logs = ray_job("logs", job_id)
    assert "flexi run: terminated. Finished stages are kept" in logs
    assert all(f"{stage}: reused" in logs for stage in ("score", "route", "eval:base")), logs[-3000:]
    supervisor = Path(cluster["RAY_TMP"], "session_latest", "logs", "jobs", f"supervisor-{job_id}.log").read_text()
    assert "terminated gracefully with SIGTERM" in supervisor, supervisor[-2000:]  # not SIGKILLed
    status = {r["info"]["run_name"]: r["info"]["status"] for r in _mlflow_runs(cluster["MLFLOW_URI"], experiment)}
    assert status["own-data"] == status["train:lora-8"] == "KILLED", status
    assert status["score"] == "FINISHED", status


def _mlflow_runs(uri: str, experiment: str) -> list[dict]:
    """Every run of `experiment` on the MLflow server at `uri`, through its REST API."""
    exp = json.loads(urllib.request.urlopen(
        f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}", timeout=30).read())
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp["experiment"]["experiment_id"]],
                                                      "max_results": 1000}).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())["runs"]


def test_job_entry_point_names_the_fix_when_the_clusters_python_lacks_the_project():
    """A head started from a plain shell gives jobs the system Python: the entry point says so, first."""
    done = subprocess.run([sys.executable, "-S", "jobs/run.py", "jobs/quickstart.yaml"], check=False, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)  # -S: no site-packages, as a bare Python
    assert done.returncode == 1
    assert "lacks torch" in done.stderr and "scripts/local-cluster.sh start" in done.stderr
