"""Starting or joining Ray the same way from the CLI, from `ray job submit` and from tests."""

from __future__ import annotations

import os

from flexi_workflows.recipes.schema import RayConfig

# Variables Ray workers need: they are separate processes that import the project.
_WORKER_ENV = ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")


def ensure_ray(config: RayConfig | None = None) -> None:
    """Join the cluster named by `ray.address` (or RAY_ADDRESS, as under `ray job submit`), else start
    a local one. Already connected (e.g. a test's local cluster): nothing to do."""
    import ray

    if ray.is_initialized():
        return
    config = config or RayConfig()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train polls workers every 2 s by default, which makes every report cost ~2 s
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    env_vars = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    kwargs = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": True}
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # with its dashboard: Ray Train's PlacementGroupCleaner asks the state API (served by the
        # dashboard) whether a controller died — a sweep trial stopped by its scheduler, a killed
        # driver — and without it the dead run's placement group keeps its CPUs forever
        ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
