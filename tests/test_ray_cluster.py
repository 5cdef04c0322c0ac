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


def test_a_run_beside_another_local_cluster_keeps_ray_trains_group_cleaner_watching(ray_local, tmp_path,
                                                                                    tiny_model_dir):
    """Two local clusters on one machine (here the test session's and the run's own): Ray Train's
    PlacementGroupCleaner asks the state API for its controller with no address, and Ray, finding two
    clusters, raised "Found multiple active Ray instances", which ended the cleaner's watch with a
    traceback on the run's console. The run points its cluster's processes at its own dashboard."""
    import subprocess

    import yaml

    from tests.conftest import REPO_ROOT
    from tests.helpers import small_recipe_data

    assert ray_local.is_initialized()  # the other cluster
    data = small_recipe_data(tmp_path, tiny_model_dir, method={"name": "lora", "rank": 4},
                             training={"epochs": 2}, evaluation={"include_base": False})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    done = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "flexi"), "run", str(path)], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert "PlacementGroupCleaner" not in console and "multiple active Ray instances" not in console, console[-4000:]
