"""`ray job submit` against a head node started by the test: a small recipe's run, then its sweep,
each to SUCCEEDED, through the one entry point jobs/run.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, free_port
from tests.helpers import write_math_set

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_ray_job_submit_runs_a_recipe(tmp_path, tiny_model_dir):
    train, evals = write_math_set(tmp_path / "train.jsonl", 32), write_math_set(tmp_path / "eval.jsonl", 6)
    recipe = {
        "name": "job", "output_dir": str(tmp_path / "out"),
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

    # as after `source .venv/bin/activate`: the job's `python` is the project's environment
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    # a short temp dir: Ray's unix sockets live under it and socket paths are limited to ~107 bytes
    ray_tmp = Path(tempfile.mkdtemp(prefix="flexi-ray-", dir="/tmp"))
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = free_port(), free_port()
    # every port of its own: the session's local cluster (other tests) holds Ray's default agent ports
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port",
                                                     "ray-client-server-port")]
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--include-dashboard=true",
         f"--temp-dir={ray_tmp}", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail("the Ray head did not come up")
        def submit_job(submission_id: str, *args: str) -> None:
            for attempt in range(10):  # the head's job agent comes up a little after its dashboard
                submit = subprocess.run(
                    [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", submission_id,
                     "--working-dir", str(REPO_ROOT), "--", "python", "jobs/run.py", *args],
                    env=env, capture_output=True, text=True, timeout=600,
                )
                if "No available agent" not in submit.stderr + submit.stdout:
                    break
                time.sleep(3)
            assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
            status = subprocess.run(
                [sys.executable, "-c", "import sys; from ray.job_submission import JobSubmissionClient as C; "
                 "print(C(sys.argv[1]).get_job_status(sys.argv[2]))", address, submission_id],
                env=env, capture_output=True, text=True, timeout=120,
            )
            assert status.stdout.strip().endswith("SUCCEEDED"), status.stdout + status.stderr

        submit_job("flexi-test-job", str(recipe_path))
        assert (tmp_path / "out" / "summary.json").is_file()
        assert (tmp_path / "out" / "mlflow.db").is_file()

        # the same entry point runs the recipe's sweep: two trials over the seed, on the head's two CPUs
        sweep = {**recipe, "name": "job-sweep", "output_dir": str(tmp_path / "sweep"),
                 "sweep": {"space": {"seed": [0, 1]}, "metric": "accuracy_all", "max_concurrent_trials": 2}}
        sweep_path = tmp_path / "job-sweep.yaml"
        sweep_path.write_text(yaml.safe_dump(sweep))
        submit_job("flexi-test-sweep", "sweep", str(sweep_path))
        state = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
        assert state["finished"] == 2 and state["failed"] == 0
        assert (tmp_path / "sweep" / "report" / "report.json").is_file()
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # stops this head only (its own process group), not other clusters
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
