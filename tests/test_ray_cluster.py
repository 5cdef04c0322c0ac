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
