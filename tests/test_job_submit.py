"""`ray job submit` through scripts/local-cluster.sh, as the README shows it: a small recipe's run, then its
sweep, each to SUCCEEDED through the one entry point jobs/run.py, tracked to the cluster's MLflow server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.helpers import write_math_set

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_ray_job_submit_runs_a_recipe(tmp_path, tiny_model_dir):
    """The README's local-cluster commands: start a head and an MLflow server from the project's environment,
    submit a recipe (then its sweep) as Ray jobs, stop both — with no environment the README does not show."""
    train, evals = write_math_set(tmp_path / "train.jsonl", 32), write_math_set(tmp_path / "eval.jsonl", 6)
    # relative, as in the shipped recipes: the job runs in Ray's temporary copy of the checkout, and the
    # script makes it absolute so the results land in this checkout
    out_rel = f"outputs/test-job-{tmp_path.name}"
    recipe = {
        "name": "job", "output_dir": out_rel,
        "model": {"name_or_path": str(tiny_model_dir)},
        "task": {"name": "math", "train": {"path": str(train)}, "eval": [{"name": "mini", "path": str(evals)}]},
        "method": {"name": "lora", "rank": 2},
        "training": {"max_steps": 2, "micro_batch_size": 4},
        "distribution": {"num_workers": 1},
        "evaluation": {"batch_size": 6, "max_new_tokens": 4},
        "tracking": {"enabled": True},
    }
    recipe_path = tmp_path / "job.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    # a newcomer's shell: no virtualenv on PATH, no Ray address, no auth mode
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != BIN)
    state = REPO_ROOT / ".local-cluster"
    if (state / "env").exists():
        pytest.skip("a local cluster from scripts/local-cluster.sh is already running in this checkout")

    def script(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "scripts/local-cluster.sh", *args], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)

    started = script("start", timeout=300)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        uri = dict(line.split("=", 1) for line in (state / "env").read_text().split())["MLFLOW_URI"]
        done = script("submit", str(recipe_path))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout
        assert (REPO_ROOT / out_rel / "summary.json").is_file()
        # tracked to the cluster's MLflow server, not to a sqlite file beside the driver
        assert not (REPO_ROOT / out_rel / "mlflow.db").exists()
        found = json.loads(subprocess.run(
            [sys.executable, "-c", "import json, sys, urllib.request; print(urllib.request.urlopen(sys.argv[1] + "
             "'/api/2.0/mlflow/experiments/get-by-name?experiment_name=flexi-workflows').read().decode())", uri],
            capture_output=True, text=True, timeout=60).stdout)
        assert found["experiment"]["name"] == "flexi-workflows"

        # the same entry point runs the recipe's sweep, two trials over the seed, in the same output folder:
        # the seed-0 trial is the run above, whose finished stages it finds (only seed 1 trains)
        sweep = {**recipe, "name": "job-sweep",
                 "sweep": {"space": {"seed": [0, 1]}, "metric": "accuracy_all", "max_concurrent_trials": 2}}
        sweep_path = tmp_path / "job-sweep.yaml"
        sweep_path.write_text(yaml.safe_dump(sweep))
        done = script("submit", "sweep", str(sweep_path))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        state_json = json.loads((REPO_ROOT / out_rel / "sweep.json").read_text())
        assert state_json["finished"] == 2 and state_json["failed"] == 0
        assert (REPO_ROOT / out_rel / "report" / "report.json").is_file()
        by_seed = {t["overrides"]["seed"]: t["trial_id"] for t in state_json["trials"]}
        reused = json.loads((REPO_ROOT / out_rel / "trials" / f"{by_seed[0]}.json").read_text())["summary"]["stages"]
        assert all(stage["cached"] for stage in reused.values()), reused
    finally:
        shutil.rmtree(REPO_ROOT / out_rel, ignore_errors=True)  # the job's results in this checkout's outputs/
        stopped = script("stop", timeout=180)
    assert stopped.returncode == 0, stopped.stderr
    assert not (state / "env").exists()


def test_job_entry_point_names_the_fix_when_the_clusters_python_lacks_the_project():
    """A head started from a plain shell gives jobs the system Python: the entry point says so, first."""
    done = subprocess.run([sys.executable, "-S", "jobs/run.py", "jobs/quickstart.yaml"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)  # -S: no site-packages, as a bare Python
    assert done.returncode == 1
    assert "lacks torch" in done.stderr and "scripts/local-cluster.sh start" in done.stderr
