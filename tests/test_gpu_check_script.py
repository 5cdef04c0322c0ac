"""bench/gpu_check.sh needs a GPU to run for real (never in CI); what can be checked without one is checked
here: both shell scripts parse, the check's options are understood. `bash bench/gpu_check.sh --dry-run`
runs every part tiny on CPU (a few minutes on 2 cores: by hand, not in this suite)."""

from __future__ import annotations

import subprocess
import sys

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
