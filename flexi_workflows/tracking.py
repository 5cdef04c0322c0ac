"""MLflow tracking: runs, params, metrics and artifacts for results it is handed.

Uses the plain `MlflowClient` (no global active run), so the driver, Ray Train's rank-0 worker, Tune
trials and tests can all log to the same runs by id. It knows nothing of recipes or stages beyond
the `StageResult` it logs: the pipeline and the sweep decide what is logged where. Default store:
sqlite at <output_dir>/mlflow.db with artifacts beside it; any tracking URI (e.g. http://127.0.0.1:5000)
works instead, and a server that cannot be reached is reported before any stage starts.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flexi_workflows.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_tracking_uri(uri: str | None, output_dir: str | Path) -> str:
    """The configured URI, or a sqlite store at <output_dir>/mlflow.db."""
    if uri:
        return uri
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db').as_posix()}"


# the stores MLflow 3 takes besides http(s) and sqlite (SQLAlchemy databases and Databricks)
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


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
    else:  # a database server (postgresql://, mysql://, ...) or Databricks: MLflow checks it; anything else is a typo
        scheme = uri.split("://", 1)[0].split("+", 1)[0]
        if scheme not in TRACKING_SCHEMES:
            raise ConfigError(f"{key} {uri}: MLflow cannot store runs at a {scheme}:// URI; use http(s)://HOST:PORT "
                              f"(a tracking server), sqlite:///PATH/mlflow.db, or a database URI "
                              f"({', '.join(s + '://' for s in TRACKING_SCHEMES[3:])})")


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def git_tags(path: str | Path) -> dict[str, str]:
    """The commit of the git checkout that `path` (the code that ran) is tracked in, and whether the
    checkout had uncommitted changes then (a commit alone would not reproduce the run). {} without git,
    outside a checkout, or for an installed copy that merely lies below some checkout's folder."""
    path = Path(path).resolve()
    folder = path if path.is_dir() else path.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                                  check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit or git("ls-files", "--error-unmatch", str(path)) is None:
        return {}
    status = git("status", "--porcelain")
    tags = {"mlflow.source.git.commit": commit.strip(), "flexi.git_commit": commit.strip()}
    if status is not None:
        tags["flexi.git_dirty"] = str(bool(status.strip())).lower()
    return tags


def owner_tags() -> dict[str, str]:
    """Which process owns a run (host, pid and the pid's start time, so a reused pid is not mistaken for
    it): Tracker.close_abandoned closes a run whose owner is gone."""
    import socket

    import psutil

    me = psutil.Process()
    return {"flexi.host": socket.gethostname(), "flexi.pid": str(me.pid), "flexi.pid_started": repr(me.create_time())}


def code_tags() -> dict[str, str]:
    """git_tags of the flexi_workflows package itself."""
    return git_tags(Path(__file__).resolve().parent / "__init__.py")


def dataset_source(uri: str | None, hub_name: str | None = None):
    """An mlflow.data source for a data file/folder (any URI MLflow knows: local, s3://, ...) or a hub dataset."""
    if uri:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": local paths match twice
            warnings.simplefilter("ignore")
            return resolve_dataset_source(uri)
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    return HuggingFaceDatasetSource(path=hub_name)


def _tolerant(fn: Callable) -> Callable:
    """Tracking never costs a run: a Tracker call that fails (the server stopped answering, a store
    error) is recorded in `tracker.missed` with what it would have logged, and the run goes on; for
    RETRY_S after a failure, calls are recorded without trying. A call on a run that could not be
    started (run id None) is recorded too. The pipeline writes what was missed beside its summary."""
    takes_run = "run_id" in fn.__code__.co_varnames[1:2]

    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        if self._depth:  # inside another tolerant call: its failure is that call's
            return fn(self, *args, **kwargs)
        run_id = args[0] if args else kwargs.get("run_id")
        if (takes_run and run_id is None) or time.time() < self._away_until:
            self._miss(fn.__name__, args, kwargs, None)
            return None
        self._depth += 1
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 — MLflow's, the HTTP client's, the store's: the run goes on
            self._miss(fn.__name__, args, kwargs, exc)
            return None
        finally:
            self._depth -= 1

    return call


class Tracker:
    def __init__(self, uri: str, experiment: str) -> None:
        # MLflow's defaults retry a dead server for minutes per call; _tolerant records the call instead
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri = uri
        self.missed: list[dict[str, Any]] = []
        self._away_until = 0.0
        self._depth = 0
        self.code_tags = {**code_tags(), **owner_tags()}  # on every run this tracker starts
        if uri.startswith("sqlite:///"):  # processes creating one store at once (sweep trials, two runs sharing
            # a tracking_uri) would race in MLflow's table creation ("table experiments already exists")
            from flexi_workflows.storage import file_lock

            db = Path(uri[len("sqlite:///"):])
            with file_lock(db.parent / f".{db.name}.lock"):
                self._open(uri, experiment, (db.parent / "mlartifacts").as_uri())
        else:
            self._open(uri, experiment, None)

    def _open(self, uri: str, experiment: str, location: str | None) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
            return
        try:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        except MlflowException:  # another process created it since (a tracking server has no lock to share)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                raise
            self.experiment_id = found.experiment_id

    RETRY_S = 30.0

    @_tolerant
    def close_abandoned(self) -> list[str]:
        """Runs of this experiment left RUNNING by a process of this host that is gone (a driver killed
        with SIGKILL, a lost trial) are closed as KILLED: MLflow would show them running forever. A run
        whose process still runs (same pid and start time) is left alone."""
        import socket

        import psutil

        closed = []
        runs = self.client.search_runs([self.experiment_id], max_results=1000,
                                       filter_string=f"attributes.status = 'RUNNING' and "
                                                     f"tags.`flexi.host` = '{socket.gethostname()}'")
        for run in runs:
            pid, started = run.data.tags.get("flexi.pid"), run.data.tags.get("flexi.pid_started")
            try:
                alive = psutil.Process(int(pid)).create_time() == float(started)
            except (psutil.NoSuchProcess, TypeError, ValueError):
                alive = False
            if not alive:
                self.client.set_terminated(run.info.run_id, "KILLED")
                closed.append(run.info.run_id)
        if closed:
            log.info("MLflow: %d run(s) left RUNNING by a process that is gone closed as KILLED", len(closed))
        return closed

    def _miss(self, call: str, args: tuple, kwargs: dict, exc: Exception | None) -> None:
        if exc is not None:
            if time.time() >= self._away_until:  # once per outage
                log.warning("MLflow at %s failed (%s: %s); the run goes on, and what is not recorded is listed in "
                            "mlflow_missed.json beside the summary", self.uri, type(exc).__name__, str(exc)[:200])
            self._away_until = time.time() + self.RETRY_S
        self.missed.append({"call": call, "at": time.strftime("%H:%M:%S"),
                            "error": f"{type(exc).__name__}: {str(exc)[:300]}" if exc else None,
                            "args": json.loads(json.dumps([*args, kwargs], default=str))})

    def save_missed(self, path: Path) -> None:
        """What could not be recorded, with its values (metrics, tags, params), for a later look or replay."""
        if self.missed:
            from flexi_workflows.fsutil import write_json_atomic

            write_json_atomic(path, {"tracking_uri": self.uri, "missed": self.missed})

    # -- runs ---------------------------------------------------------------------------------------
    @_tolerant
    def start_run(self, name: str, *, parent_id: str | None = None, params: dict[str, Any] | None = None,
                  tags: dict[str, str] | None = None) -> str:
        tags = {**self.code_tags, **(tags or {})}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    @_tolerant
    def find_child(self, parent_id: str, tags: dict[str, str]) -> str | None:
        """The id of a run under `parent_id` carrying `tags`, if one exists."""
        clauses = [f"tags.mlflow.parentRunId = '{parent_id}'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        runs = self.client.search_runs([self.experiment_id], filter_string=" and ".join(clauses), max_results=1)
        return runs[0].info.run_id if runs else None

    @_tolerant
    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    @_tolerant
    def computed_by(self, fingerprint: str) -> str | None:
        """The id of the latest run of this experiment that computed the stage with `fingerprint` (and
        uploaded its artifacts), if one did."""
        runs = self.client.search_runs([self.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                                       filter_string=f"tags.`flexi.fingerprint` = '{fingerprint}' "
                                                     f"and tags.`flexi.cached` = 'false'")
        return runs[0].info.run_id if runs else None

    @_tolerant
    def link_cached(self, run_id: str, result) -> None:
        """A reused stage's run points at where its artifacts are: the stage folder (tag flexi.folder) and
        the run that computed and uploaded them (tag flexi.computed_by_run, and cached_stage.json with
        that run's artifact URI), so the files are one click away without uploading them again."""
        source = self.computed_by(result.fingerprint)
        link = {"stage": result.name, "fingerprint": result.fingerprint, "folder": result.location,
                "artifacts": list(result.manifest.get("artifacts", [])), "computed_by_run": source,
                "computed_by_artifact_uri": self.client.get_run(source).info.artifact_uri if source else None}
        if source:
            self.set_tags(run_id, {"flexi.computed_by_run": source})
        self.client.log_dict(run_id, link, "cached_stage.json")

    @_tolerant
    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    # -- logging ------------------------------------------------------------------------------------
    @_tolerant
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    @_tolerant
    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if _numeric(v)]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start : start + 500])

    @_tolerant
    def log_curve(self, run_id: str, key: str, points: list[list[float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(v), now, int(step)) for step, v in points]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start : start + 500])

    @_tolerant
    def log_datasets(self, run_id: str, datasets: list[dict[str, Any]]) -> None:
        """Each {name, uri | hub_name, digest, context} as an input dataset of the run (mlflow.data
        metadata: where it lies and the digest of what was used, not a copy of the rows)."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for d in datasets:
            source = dataset_source(d.get("uri"), d.get("hub_name"))
            entity = MetaDataset(source, name=d["name"], digest=d["digest"])._to_mlflow_entity()
            inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", d["context"])]))
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    # -- models -------------------------------------------------------------------------------------
    @_tolerant
    def find_model(self, tags: dict[str, str]) -> str | None:
        """The id of a READY logged model of this experiment carrying `tags`, if one exists."""
        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        found = self.client.search_logged_models([self.experiment_id], filter_string=" AND ".join(clauses),
                                                 max_results=10)
        ready = [m for m in found if str(m.status).endswith("READY")]
        return ready[0].model_id if ready else None

    @_tolerant
    def log_model(self, run_id: str, name: str, folder: Path, *, tags: dict[str, str], model_type: str) -> str:
        """`folder` as an MLflow logged model produced by `run_id`: its files are the model's artifacts
        (`models:/<id>` downloads them), linked to the run as its output; returns the model id."""
        from mlflow.entities import LoggedModelOutput

        model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=run_id,
                                                tags={**self.code_tags, **tags}, model_type=model_type)
        try:
            self.client.log_model_artifacts(model.model_id, str(folder))
        except BaseException:
            self.client.finalize_logged_model(model.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
        return model.model_id

    @_tolerant
    def register(self, model_id: str, name: str, *, run_id: str | None, tags: dict[str, str]) -> str:
        """A version of registered model `name` for logged model `model_id` — the existing one if a version
        already carries `tags` (a rerun registers nothing new); returns the version."""
        from mlflow.exceptions import MlflowException

        clauses = " AND ".join([f"name = '{name}'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()])
        found = self.client.search_model_versions(clauses)
        if found:
            return str(found[0].version)
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        version = self.client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id,
                                                   tags=tags, model_id=model_id)
        return str(version.version)

    @_tolerant
    def log_artifacts(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path or path.name)
        elif path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)

    @_tolerant
    def log_stage(self, run_id: str, result, *, curves_logged: bool = False, skip: tuple[str, ...] = ()) -> None:
        """A stage's params, metrics and curves — fresh or reused — so a rerun's run shows the same results;
        artifacts (adapters, predictions, plots) are uploaded once, by the run that computed them, and a
        reused stage's run points at its folder (tag flexi.folder). `skip`: artifacts uploaded elsewhere
        (the train stage's artifact: as a logged model, not a second copy in the run)."""
        self.set_tags(run_id, {"flexi.stage": result.kind, "flexi.cached": str(result.cached).lower(),
                               "flexi.fingerprint": result.fingerprint, "flexi.folder": result.location})
        if result.params:
            self.log_params(run_id, result.params)
        self.log_metrics(run_id, result.metrics)
        if not curves_logged:
            for key, points in result.manifest.get("curves", {}).items():
                self.log_curve(run_id, key, points)
        if result.cached:  # uploaded by the run that computed it; not again for every rerun and trial
            self.link_cached(run_id, result)
            return
        for path in result.artifacts:
            if path.name not in skip:
                self.log_artifacts(run_id, path)
