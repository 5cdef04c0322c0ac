"""MLflow tracking: one parent run per pipeline, one child run per stage and method.

Uses the plain `MlflowClient` (no global active run), so the driver, Ray Train's rank-0 worker and
tests can all log to the same runs by id. Default store: sqlite at <output_dir>/mlflow.db with
artifacts beside it; any `tracking.tracking_uri` (e.g. http://127.0.0.1:5000) works instead, and a
server that cannot be reached is reported before any stage starts.
"""

from __future__ import annotations

import json
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from flexi_workflows.errors import ConfigError
from flexi_workflows.recipes.loader import flatten
from flexi_workflows.recipes.schema import MethodConfig, Recipe


def tracking_uri(recipe: Recipe) -> str:
    if recipe.tracking.tracking_uri:
        return recipe.tracking.tracking_uri
    return f"sqlite:///{(Path(recipe.output_dir).resolve() / 'mlflow.db').as_posix()}"


def check_tracking(recipe: Recipe) -> None:
    """Fail fast on a tracking store that cannot be used."""
    uri = tracking_uri(recipe)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                if response.status != 200:
                    raise ConfigError(f"tracking.tracking_uri {uri}: /health answered {response.status}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"tracking.tracking_uri {uri}: the MLflow server cannot be reached ({reason})") from None
    elif uri.startswith("file:") or "://" not in uri:
        raise ConfigError(
            f"tracking.tracking_uri {uri}: MLflow 3 refuses file stores by default; use sqlite:///PATH/mlflow.db "
            f"or a server URL"
        )
    elif uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]


class Tracker:
    def __init__(self, recipe: Recipe) -> None:
        from mlflow.tracking import MlflowClient

        self.recipe = recipe
        self.uri = tracking_uri(recipe)
        self.client = MlflowClient(self.uri)
        experiment = self.client.get_experiment_by_name(recipe.tracking.experiment)
        if experiment is not None:
            self.experiment_id = experiment.experiment_id
        else:
            location = None
            if self.uri.startswith("sqlite:///"):
                location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(recipe.tracking.experiment, artifact_location=location)
        self.parent_id: str | None = None
        self.children: dict[str, str] = {}

    # -- runs -----------------------------------------------------------------------------------
    def start_parent(self) -> str:
        run = self.client.create_run(self.experiment_id, run_name=self.recipe.name, tags={"flexi.kind": "pipeline"})
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, flatten(self.recipe))
        return self.parent_id

    def child(self, name: str, params: dict[str, Any] | None = None) -> str:
        if name in self.children:
            return self.children[name]
        tags = {"flexi.kind": name.split(":")[0]}
        if self.parent_id:
            tags["mlflow.parentRunId"] = self.parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.children[name] = run.info.run_id
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_child(self, name: str, recipe: Recipe, method: MethodConfig) -> str:
        params = {**flatten(recipe), **{f"method.{k}": v for k, v in flatten(method).items()}}
        return self.child(name, params)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def end_all(self, status: str = "FINISHED") -> None:
        for run_id in self.children.values():
            self.end(run_id, status)
        if self.parent_id:
            self.end(self.parent_id, status)

    # -- logging --------------------------------------------------------------------------------
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start : start + 500])

    def log_artifacts(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_recipe(self, run_id: str, recipe_path: str | None) -> None:
        if recipe_path and Path(recipe_path).is_file():
            self.log_artifacts(run_id, Path(recipe_path), "recipe")

    # -- stage-specific -------------------------------------------------------------------------
    def finish_train(self, run_id: str, out_dir: Path, report: dict) -> None:
        from flexi_workflows.plots import loss_curve_plot

        self.log_metrics(run_id, {"trainable_params": report.get("trainable_params") or 0,
                                  "train_steps": report.get("steps") or 0,
                                  **{f"train_rank_share_{k}": v for k, v in report.get("routing", {}).get("rank_shares", {}).items()}})
        self.log_artifacts(run_id, out_dir / "train_report.json")
        self.log_artifacts(run_id, out_dir / "artifact", "model")
        with tempfile.TemporaryDirectory() as tmp:
            plot = loss_curve_plot(report.get("loss_curve", []), Path(tmp) / "loss_curve.png", title=report["method"])
            if plot:
                self.log_artifacts(run_id, plot, "plots")
        self.end(run_id)

    def log_eval(self, label: str, method: MethodConfig, out_dir: Path, results: dict, recipe: Recipe) -> None:
        from flexi_workflows.plots import rank_histogram_plot

        run_id = self.start_child(f"eval:{label}", recipe, method)
        params = results["params"]
        self.log_metrics(run_id, {"base_params": params["base_params"], "params_per_rank": params["params_per_rank"],
                                  "trainable_params": params.get("trainable_params") or 0})
        for name, summary in results["datasets"].items():
            metrics = {f"{name}.{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
            if summary.get("mean_active_params") is not None:
                metrics[f"{name}.mean_active_params_pct_of_base"] = 100 * summary["mean_active_params"] / params["base_params"]
            self.log_metrics(run_id, metrics)
        self.log_artifacts(run_id, out_dir / "metrics.json")
        self.log_artifacts(run_id, out_dir / "predictions", "predictions")
        with tempfile.TemporaryDirectory() as tmp:
            for name, summary in results["datasets"].items():
                if summary.get("rank_histogram"):
                    plot = rank_histogram_plot(summary["rank_histogram"], Path(tmp) / f"ranks_{name}.png",
                                               title=f"{label} on {name}")
                    self.log_artifacts(run_id, plot, "plots")
        self.end(run_id)
