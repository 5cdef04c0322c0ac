"""The README's `ray job submit` path, verbatim: the commands of its "Running on a cluster" block — start a Ray
head and an MLflow server from the project's environment, submit a recipe as a Ray job, stop both — run
exactly as written from a newcomer's shell, plus a sweep submitted through the same entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def readme_cluster_commands() -> list[str]:
    """The shell lines of the README's first bash block under "## Running on a cluster", comments dropped."""
    section = (REPO_ROOT / "README.md").read_text().split("\n## Running on a cluster\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readme_cluster_block_starts_a_head_submits_a_recipe_and_stops(tmp_path):
    commands = readme_cluster_commands()
    assert commands == ["bash scripts/local-cluster.sh start", "bash scripts/local-cluster.sh submit jobs/own-data.yaml",
                        "bash scripts/local-cluster.sh stop"]
    start, submit, stop = commands
    # a newcomer's shell: no virtualenv on PATH, no Ray address, no auth mode
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != BIN)
    state = REPO_ROOT / ".local-cluster"
    if (state / "env").exists():
        pytest.skip("a local cluster from scripts/local-cluster.sh is already running in this checkout")
    out = REPO_ROOT / "outputs" / "own-data"  # where `flexi run jobs/own-data.yaml` puts its results
    before_sweep: set[str] = set()  # what outputs/own-data held before the test's sweep wrote its files there

    def shell(command: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)

    started = shell(start, timeout=300)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        uri = dict(line.split("=", 1) for line in (state / "env").read_text().split())["MLFLOW_URI"]
        done = shell(submit)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout
        assert "acc all" in done.stdout and "flexi-2-8" in done.stdout  # the comparison table, in the job's log
        summary = json.loads((out / "summary.json").read_text())
        rows = {r["method"]: r for r in summary["rows"]}
        assert set(rows) == {"base", "lora-8", "flexi-2-8"}
        assert rows["flexi-2-8"]["mean_active_params"] < rows["lora-8"]["mean_active_params"]
        # tracked to the cluster's MLflow server: the job's pipeline run and a run per stage
        exp = json.loads(urllib.request.urlopen(
            f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=flexi-workflows", timeout=30).read())
        request = urllib.request.Request(f"{uri}/api/2.0/mlflow/runs/search", method="POST",
                                         data=json.dumps({"experiment_ids": [exp["experiment"]["experiment_id"]],
                                                          "max_results": 1000}).encode(),
                                         headers={"Content-Type": "application/json"})
        names = {r["info"]["run_name"] for r in json.loads(urllib.request.urlopen(request, timeout=30).read())["runs"]}
        assert {"own-data", "score", "route", "train:lora-8", "train:flexi-2-8", "eval:flexi-2-8"} <= names, names

        # `submit sweep RECIPE` (README): the same entry point runs a sweep; here the recipe over one seed,
        # whose one trial is the job above, found finished (every stage reused)
        before_sweep = set(os.listdir(out))
        sweep_path = tmp_path / "own-data-sweep.yaml"
        sweep_path.write_text((REPO_ROOT / "jobs" / "own-data.yaml").read_text()
                              + "sweep:\n  space:\n    seed: [0]\n  metric: accuracy_all\n")
        done = shell(f"bash scripts/local-cluster.sh submit sweep {sweep_path}")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        sweep = json.loads((out / "sweep.json").read_text())
        assert sweep["finished"] == 1 and sweep["failed"] == 0
        assert (out / "report" / "report.json").is_file()
        (trial,) = sweep["trials"]
        stages = json.loads((out / "trials" / f"{trial['trial_id']}.json").read_text())["summary"]["stages"]
        assert stages and all(stage["cached"] for stage in stages.values()), stages
    finally:
        for name in set(os.listdir(out)) - before_sweep if before_sweep else ():  # the sweep's files, not the run's
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
        stopped = shell(stop, timeout=180)
    assert stopped.returncode == 0, stopped.stderr
    assert not (state / "env").exists()


def test_job_entry_point_names_the_fix_when_the_clusters_python_lacks_the_project():
    """A head started from a plain shell gives jobs the system Python: the entry point says so, first."""
    done = subprocess.run([sys.executable, "-S", "jobs/run.py", "jobs/quickstart.yaml"], check=False, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)  # -S: no site-packages, as a bare Python
    assert done.returncode == 1
    assert "lacks torch" in done.stderr and "scripts/local-cluster.sh start" in done.stderr
