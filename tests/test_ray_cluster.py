"""ensure_ray on a cluster someone else started (a notebook's or a test's own ray.init)."""

from __future__ import annotations

import os

from flexi_workflows.ray_cluster import ensure_ray


def test_a_cluster_joined_before_still_gets_ray_trains_driver_settings(ray_local, monkeypatch):
    """Ray Train reads these in the driver at every fit(): left unset, its controller polls workers every
    2 s, which added about 4 s to the end of every training run (and 2 s to each report) in tests that
    share one cluster. A user's own value wins."""
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")
    ensure_ray()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.1"
    assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "1"


def test_a_dashboard_port_taken_before_ray_binds_it_starts_the_cluster_again_on_another(tmp_path):
    """The dashboard's port is picked free and bound by Ray a moment later; taken in between, Ray starts with
    no dashboard, so no state API for Ray Train's placement-group cleaner. ensure_ray starts again on a
    fresh port, and RAY_API_SERVER_ADDRESS names the dashboard that runs."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    script = (
        "import json, os, socket, ray\n"
        "import flexi_workflows.ray_cluster as rc\n"
        "taken = socket.socket(); taken.bind(('127.0.0.1', 0)); taken.listen()\n"
        "picks, pick = [], rc._free_port\n"
        "rc._free_port = lambda: picks.append(taken.getsockname()[1] if not picks else pick()) or picks[-1]\n"
        "rc.ensure_ray()\n"
        "api = os.environ['RAY_API_SERVER_ADDRESS']\n"
        "from ray.util.state import list_nodes\n"
        "nodes = len(list_nodes())  # the state API, found as Ray Train's cleaner finds it\n"
        "print(json.dumps({'picks': picks, 'taken': taken.getsockname()[1], 'api': api, 'nodes': nodes}))\n"
        "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    done = subprocess.run([sys.executable, "-c", script], check=False, cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(REPO_ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(out["picks"]) == 2 and out["picks"][0] == out["taken"] != out["picks"][1], out
    assert out["api"] == f"http://127.0.0.1:{out['picks'][1]}" and out["nodes"] == 1, out
    assert "starting the local cluster again on another" in done.stderr
