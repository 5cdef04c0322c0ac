"""MLflow tracking: runs, params, metrics and artifacts for results it is handed.

Uses the plain `MlflowClient` (no global active run), so the driver, Ray Train's rank-0 worker, Tune
trials and tests can all log to the same runs by id. It knows nothing of recipes or stages beyond
the `StageResult` it logs: the pipeline and the sweep decide what is logged where. Default store:
sqlite at <output_dir>/mlflow.db with artifacts beside it; any tracking URI (e.g. http://127.0.0.1:5000)
works instead, and a server that cannot be reached is reported before any stage starts.
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from flexi_workflows.errors import ConfigError


def resolve_tracking_uri(uri: str | None, output_dir: str | Path) -> str:
    """The configured URI, or a sqlite store at <output_dir>/mlflow.db."""
    if uri:
        return uri
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db').as_posix()}"


def check_tracking_uri(uri: str, key: str = "tracking.tracking_uri") -> None:
    """Fail fast on a tracking store that cannot be used."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                if response.status != 200:
                    raise ConfigError(f"{key} {uri}: /health answered {response.status}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"{key} {uri}: the MLflow server cannot be reached ({reason})") from None
    elif uri.startswith("file:") or "://" not in uri:
        raise ConfigError(f"{key} {uri}: MLflow 3 refuses file stores by default; use sqlite:///PATH/mlflow.db "
                          f"or a server URL")
    elif uri.startswith("sqlite:///"):  # a folder that can be made and written; nothing is created here
        db = Path(uri[len("sqlite:///"):])
        if db.is_dir():
            raise ConfigError(f"{key} {uri}: {db} is a folder; name the database file, e.g. {db / 'mlflow.db'}")
        existing = next(p for p in (db, *db.parents) if p.exists())
        folder = existing if existing != db else db.parent
        try:  # a probe, removed at once (os.access says yes to root even on /proc)
            probe = Path(tempfile.mkdtemp(prefix=".flexi-probe-", dir=folder))
            probe.rmdir()
        except OSError as exc:
            raise ConfigError(f"{key} {uri}: {folder} is not writable ({exc.strerror}), so the MLflow database cannot "
                              f"be created there; use a folder you can write, or a tracking server URL") from None


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Tracker:
    def __init__(self, uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)

    # -- runs ---------------------------------------------------------------------------------------
    def start_run(self, name: str, *, parent_id: str | None = None, params: dict[str, Any] | None = None,
                  tags: dict[str, str] | None = None) -> str:
        tags = dict(tags or {})
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def find_child(self, parent_id: str, tags: dict[str, str]) -> str | None:
        """The id of a run under `parent_id` carrying `tags`, if one exists."""
        clauses = [f"tags.mlflow.parentRunId = '{parent_id}'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        runs = self.client.search_runs([self.experiment_id], filter_string=" and ".join(clauses), max_results=1)
        return runs[0].info.run_id if runs else None

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    # -- logging ------------------------------------------------------------------------------------
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if _numeric(v)]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start : start + 500])

    def log_curve(self, run_id: str, key: str, points: list[list[float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(v), now, int(step)) for step, v in points]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start : start + 500])

    def log_artifacts(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path or path.name)
        elif path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_stage(self, run_id: str, result, *, curves_logged: bool = False) -> None:
        """A stage's params, metrics and curves — fresh or reused — so a rerun's run shows the same results;
        artifacts (adapters, predictions, plots) are uploaded once, by the run that computed them, and a
        reused stage's run points at its folder (tag flexi.folder)."""
        self.set_tags(run_id, {"flexi.stage": result.kind, "flexi.cached": str(result.cached).lower(),
                               "flexi.fingerprint": result.fingerprint, "flexi.folder": result.location})
        if result.params:
            self.log_params(run_id, result.params)
        self.log_metrics(run_id, result.metrics)
        if not curves_logged:
            for key, points in result.manifest.get("curves", {}).items():
                self.log_curve(run_id, key, points)
        if result.cached:  # uploaded by the run that computed it; not again for every rerun and trial
            return
        for path in result.artifacts:
            self.log_artifacts(run_id, path)
