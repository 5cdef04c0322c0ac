"""bench/gpu_check.sh needs a GPU to run for real (never in CI); what can be checked without one is checked
here: both shell scripts parse, the check's options are understood, and `bash bench/gpu_check.sh --dry-run`
runs every part tiny on CPU and reports each as ok, so the script a lent GPU's few minutes go to has not
rotted since the last GPU session."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def test_scripts_parse():
    for script in ("bench/gpu_check.sh", "scripts/setup.sh"):
        subprocess.run(["bash", "-n", script], cwd=REPO_ROOT, check=True)


def test_gpu_check_options():
    bad = subprocess.run(["bash", "bench/gpu_check.sh", "--bogus"], check=False, cwd=REPO_ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--dry-run" in bad.stderr
    usage = subprocess.run(["bash", "bench/gpu_check.sh", "--help"], check=False, cwd=REPO_ROOT, capture_output=True, text=True)
    assert usage.returncode == 0 and "ONE JSON line" in usage.stdout
    py = subprocess.run([sys.executable, "bench/gpu_check.py", "--help"], check=False, cwd=REPO_ROOT, capture_output=True, text=True)
    assert py.returncode == 0 and "--cpu" in py.stdout


def test_setup_refuses_unknown_torch_kind():
    run = subprocess.run(["bash", "scripts/setup.sh"], check=False, cwd=REPO_ROOT, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "FLEXI_TORCH": "rocm"})
    assert run.returncode == 2 and "FLEXI_TORCH must be cpu or cuda" in run.stderr


@pytest.mark.slow
def test_dry_run_runs_every_part_on_cpu(tmp_path):
    env = {**os.environ, "FLEXI_PYTHON": sys.executable, "GPU_CHECK_LOGS": str(tmp_path / "logs"),
           "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], check=False, cwd=REPO_ROOT, capture_output=True,
                         text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["status"] == {"train_and_generation": "ok", "adapter": "ok", "zero_memory": "2:0,3:0"}, out["errors"]
    assert out["zero2"]["steps"] == out["zero3"]["steps"] == 4 and out["generation"]["rows"] == 8
    assert out["zero2"]["plan_gib"]["total"] > 0 and out["adapter"]["merged_tokens_equal_unmerged"] is True
    trainable = out["zero2"]["trainable_params"]
    assert [(z["stage"], z["reduce_bucket_elements"]) for z in out["zero_memory"]] == [(2, trainable), (3, trainable)]
    # ZeRO-3's forward saves what ZeRO-2's does: DeepSpeed's ZeRO-3 linear saved the input of every frozen
    # linear too (1.27 GiB more on the H200 check); the worker's own keeps the weight parameters, not views
    z2, z3 = ({k: (v["saved_activations_mib"], v["saved_weight_views_mib"]) for k, v in z["phases"].items()
               if k.endswith("forward")} for z in out["zero_memory"])
    assert [z["linear"] for z in out["zero_memory"]] == ["torch", "frozen-aware"]
    assert {k: a for k, (a, _) in z3.items()} == {k: a for k, (a, _) in z2.items()} and len(z2) == 3
    assert min(a for a, _ in z2.values()) > 0 and all(v == 0 for _, v in z3.values())
