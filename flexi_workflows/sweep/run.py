"""The sweep driver and its Tune trial.

    recipe + sweep.space ──► trials (space.py), each recipe built and checked ──► every trial planned
        ──► stages two or more trials share (score, routers, baselines) run once, here
        ──► Tuner(with_resources(run_trial), grid over the trials, max_concurrent_trials)
              each trial: run_pipeline(trial recipe) — its own stages, the shared ones found finished
        ──► trial records ──► best trial, `flexi report`, MLflow

<sweep_dir> is the recipe's output_dir: stages under <sweep_dir>/<stage>/..., trial records under
<sweep_dir>/trials/<trial>.json (+ the trial's summary folder), Tune's state under
<sweep_dir>/tune/. Rerunning the same sweep restores Tune's state: finished trials are not run
again, and an unfinished trial finds its finished stages and goes on from there.

With `storage` somewhere else (s3://..., a folder every node mounts), trials run on any node and write
their records, summaries and Tune's state there instead, under sweeps/<fingerprint>/ (records_home);
the driver copies the records back into <sweep_dir>/trials/ for the report, so the sweep's
output_dir is the driver's alone, as a run's is.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from flexi_workflows.errors import ConfigError
from flexi_workflows.fsutil import fingerprint, write_json_atomic
from flexi_workflows.metrics import lower_is_better
from flexi_workflows.recipes.loader import build, flatten, to_dict
from flexi_workflows.recipes.schema import Recipe
from flexi_workflows.stages.inputs import RESULT_NEUTRAL
from flexi_workflows.sweep.space import Trial, expand_space

log = logging.getLogger(__name__)
SWEEP_FILE = "sweep.json"
TRIALS = "trials"
FAIL_TRIAL_ENV = "FLEXI_TEST_FAIL_TRIAL"  # test-only: a trial with these overrides raises


def reported_columns(recipe: Recipe, dataset_rows: list[dict]) -> set[str]:
    """The numeric columns a trial's summary row for the main method carries (pipeline.summary_rows)."""
    from flexi_workflows.methods import get_method
    from flexi_workflows.tasks import get_task

    task = get_task(recipe.task)
    groups = sorted({r.get("group") for r in dataset_rows if r.get("group")})
    columns = {f"{task.metric}_all"} | {f"{task.metric}_{g}" for g in groups}
    if "exact_match" in task.metrics("", dataset_rows[0]):
        columns.add("exact_match_all")
    columns |= {"mean_active_params", "params_pct_of_lora8", "params_pct_of_base", "trainable_params"}
    if get_method(recipe.method).reports_ranks:
        columns |= {"mean_rank", "high_rank_rate"}
    return columns


def trial_recipe(base: dict, trial: Trial, source: str, cwd: str | None = None) -> Recipe:
    """The base recipe with the trial's overrides, its relative paths taken from the sweep's working
    directory `cwd` (a Tune trial runs in a directory of its own)."""
    from flexi_workflows.pipeline import absolute_paths

    data = json.loads(json.dumps(base))
    data.pop("sweep", None)
    recipe = build(Recipe, data, source=source, overrides=trial.override_args())
    return absolute_paths(recipe, cwd) if cwd is not None else recipe


def primary_row(summary: dict, method_label: str, dataset: str) -> dict:
    for row in summary["rows"]:
        if row["method"] == method_label and row["dataset"] == dataset:
            return row
    raise RuntimeError(f"the trial's summary has no row for {method_label} on {dataset}")


def _numeric(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# -- the trial -------------------------------------------------------------------------------------

def run_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One Tune trial: the recipe with this trial's overrides, as one nested MLflow run of the sweep.
    `config` is Tune's (the trial); `sweep` is what every trial shares (bound by tune.with_parameters)."""
    from ray import tune

    from flexi_workflows.methods import method_label
    from flexi_workflows.pipeline import run_pipeline
    from flexi_workflows.storage import Storage
    from flexi_workflows.tracking import Tracker

    trial = Trial(config["trial"]["trial_id"], config["trial"]["overrides"])
    ctx = sweep
    # the sweep folder, or the run's storage (records_home): on any node, never this node's own disk alone
    store, prefix = Storage(ctx["records"]), ctx["records_prefix"]
    record_rel = _under(prefix, f"{TRIALS}/{trial.trial_id}.json")
    if store.exists(record_rel):  # finished before an interruption that Tune's saved state had not caught up with
        done = json.loads(store.read_text(record_rel))
        if done.get("status") == "FINISHED":
            tune.report(done["metrics"])
            return
    tracker = Tracker(ctx["tracking_uri"], ctx["experiment"]) if ctx["tracking_uri"] else None
    run_id = None
    if tracker:  # one run per trial: an interrupted trial's run is picked up again when the sweep resumes
        run_id = tracker.find_child(ctx["parent_run_id"], {"flexi.trial_id": trial.trial_id})
        if run_id is None:
            run_id = tracker.start_run(f"trial {trial.trial_id}", parent_id=ctx["parent_run_id"], params=trial.overrides,
                                       tags={"flexi.kind": "trial", "flexi.trial_id": trial.trial_id})
        else:
            tracker.client.update_run(run_id, status="RUNNING")
    started = time.time()
    record: dict[str, Any] = {"trial_id": trial.trial_id, "overrides": trial.overrides, "run_id": run_id}
    try:
        fail = ctx.get("fail_trial")  # "key=value;key=value": every pair must match
        if fail and all(pair in trial.override_args() for pair in fail.split(";")):
            raise RuntimeError(f"injected failure for {fail} ({FAIL_TRIAL_ENV})")
        recipe = trial_recipe(ctx["base"], trial, ctx["source"], ctx["cwd"])
        label = method_label(recipe.method)
        summary = run_pipeline(recipe, tracker=tracker, parent_id=run_id,
                               summary_dir=store.ref(_under(prefix, f"{TRIALS}/{trial.trial_id}")),
                               quiet=True, report_to_tune=f"train:{label}" if ctx.get("scheduler") else None)
        row = primary_row(summary, label, ctx["dataset"])
        metrics = _numeric(row)
        if ctx.get("scheduler"):  # Tune checks that every result carries the scheduler's metric and time
            train = json.loads((Path(summary["stages"][f"train:{label}"]["folder"]) / "train_report.json").read_text())
            metrics["val_loss"] = train["val_loss_curve"][-1][1]
            metrics["epoch"] = train["steps"] / train["steps_per_epoch"]
        record.update(status="FINISHED", error=None, summary=summary, metrics=metrics)
    except Exception as exc:
        record.update(status="FAILED", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        record["seconds"] = round(time.time() - started, 2)
        if not store.exists(record_rel):  # a trial the scheduler stopped is recorded by the driver
            write_record(store, record_rel, record)
        if tracker:
            tracker.set_tags(run_id, {"flexi.error": record["error"][:5000]})
            tracker.end(run_id, "FAILED")
        raise
    record["seconds"] = round(time.time() - started, 2)
    write_record(store, record_rel, record)
    if tracker:
        tracker.log_metrics(run_id, metrics)
        tracker.end(run_id, "FINISHED")
    tune.report(metrics)


# -- the driver ------------------------------------------------------------------------------------

def validate_sweep(recipe: Recipe, base: dict, source: str) -> tuple[list[Trial], list[Recipe], dict]:
    """Trials, their recipes and the sweep's settings — every check done before any trial starts."""
    from flexi_workflows.tasks import get_task

    cfg = recipe.sweep
    where = f"{source}: "
    if cfg is None:
        raise ConfigError(f"{source}: the recipe has no `sweep:` section (space, metric) to sweep over")
    if not cfg.metric:
        raise ConfigError(f"{where}sweep.metric is not set (e.g. accuracy_all)")
    trials = expand_space(cfg.space, num_samples=cfg.num_samples, seed=cfg.sample_seed, where=where)
    recipes = []
    for trial in trials:
        try:
            recipes.append(trial_recipe(base, trial, source, os.getcwd()))
        except ConfigError as exc:
            keys = ", ".join(f"sweep.space.{k}" for k in trial.overrides)
            raise ConfigError(f"{where}a trial of the search space ({keys}) is not a valid recipe: {exc}") from None
    for key in cfg.space:
        if any(fnmatch.fnmatch(key, pattern) for pattern in RESULT_NEUTRAL):
            raise ConfigError(f"{where}sweep.space.{key}: this key does not change a trial's result (it is "
                              f"result-neutral); sweep over method, router, training, scoring, task, model or seed keys")
    if not recipe.task.eval:
        raise ConfigError(f"{where}task.eval lists no evaluation sets")
    dataset = cfg.dataset or recipe.task.eval[0].label
    if dataset not in {s.label for s in recipe.task.eval}:
        raise ConfigError(f"{where}sweep.dataset {dataset!r} is not an eval set of the recipe; it has: "
                          f"{', '.join(s.label for s in recipe.task.eval)}")
    source_of = {s.label: s for s in recipe.task.eval}
    rows = get_task(recipe.task).load(source_of[dataset])
    columns = set.intersection(*(reported_columns(r, rows) for r in recipes))
    if cfg.metric not in columns:
        raise ConfigError(f"{where}sweep.metric {cfg.metric!r} is not reported by the trials; they report: "
                          f"{', '.join(sorted(columns))}")
    mode = cfg.mode or ("min" if lower_is_better(cfg.metric) else "max")
    if cfg.scheduler is not None and not all(r.training.validation_rows > 0 for r in recipes):
        raise ConfigError(f"{where}sweep.scheduler stops trials on their per-epoch {cfg.scheduler.metric}, which needs "
                          f"held-out training rows: set training.validation_rows (e.g. 64)")
    return trials, recipes, {"metric": cfg.metric, "mode": mode, "dataset": dataset}


def asha(recipe: Recipe, recipes: list[Recipe]):
    """Tune's ASHA on the trials' per-epoch val_loss (time measured in epochs), or None."""
    cfg = recipe.sweep.scheduler
    if cfg is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=cfg.metric, mode=cfg.mode, max_t=max(r.training.epochs for r in recipes),
                         grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor, stop_last_trials=False)


def shared_stages(recipes: list[Recipe]) -> list:
    """Stages that two or more trials would run, once each, in dependency order."""
    from flexi_workflows.stages.plan import plan_pipeline

    seen: dict[str, Any] = {}
    count: dict[str, int] = {}
    for recipe in recipes:
        for stage in plan_pipeline(recipe).stages():
            seen.setdefault(stage.location, stage)
            count[stage.location] = count.get(stage.location, 0) + 1
    order = {"score": 0, "route": 1, "train": 2, "eval": 3}
    shared = [stage for folder, stage in seen.items() if count[folder] > 1]
    return sorted(shared, key=lambda s: order[s.kind])


def records_home(recipe: Recipe, sweep_dir: Path, sweep_fp: str) -> tuple[Any, str]:
    """(storage, prefix) where trials write their records and summaries and Tune keeps its state: the
    sweep's output_dir itself (prefix ""), or the recipe's `storage` when that is elsewhere, under
    sweeps/<sweep fingerprint>/ (one sweep's records never mix with another's)."""
    from flexi_workflows.stages.base import recipe_storage

    store = recipe_storage(recipe)
    if not store.remote and store.local == sweep_dir:
        return store, ""
    return store, f"sweeps/{sweep_fp}"


def _under(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def write_record(store, rel: str, record: dict) -> None:
    """A trial record, whole or not at all (a local file is renamed into place; an S3 PUT is atomic)."""
    store.write_bytes(rel, (json.dumps(record, indent=2, sort_keys=True, default=str) + "\n").encode())


def mirror_records(store, prefix: str, sweep_dir: Path, trials: list[Trial]) -> int:
    """Copy the trials' records and summary folders from `storage` into <sweep_dir>/trials/, where the
    driver collects them and `flexi report` reads them; returns how many records there were."""
    copied = 0
    for trial in trials:
        rel = _under(prefix, f"{TRIALS}/{trial.trial_id}")
        if not store.exists(f"{rel}.json"):
            continue
        local = sweep_dir / TRIALS / trial.trial_id
        if store.sizes(rel):
            if local.exists():
                shutil.rmtree(local)
            shutil.copytree(store.local_path(rel), local)
        write_json_atomic(sweep_dir / TRIALS / f"{trial.trial_id}.json", json.loads(store.read_text(f"{rel}.json")))
        copied += 1
    return copied


def check_sweep_dir_shared(recipe: Recipe, sweep_dir: Path) -> None:
    """Trials run on any node and write their records and summaries under the sweep's output_dir, and
    Tune keeps its experiment state there: on a cluster of several nodes it must be a folder every node
    mounts (stage results can be in `storage`, e.g. s3://, but the sweep's own records are files)."""
    from flexi_workflows.ray_cluster import joined_nodes, nodes_missing
    from flexi_workflows.storage import Storage

    nodes = joined_nodes(recipe.ray)
    if len(nodes) > 1:
        missing = nodes_missing(Storage(sweep_dir), nodes)
        if missing:
            raise ConfigError(f"output_dir: {sweep_dir} is not visible from {len(missing)} of the cluster's "
                              f"{len(nodes)} nodes; a sweep's trials write their records there from any node, so "
                              f"on a multi-node cluster a sweep's output_dir must be a folder every node mounts")


def run_sweep(recipe: Recipe, *, recipe_path: str | None = None) -> dict:
    """Run (or resume) the sweep described by the recipe's `sweep:` section; returns sweep.json's contents."""
    from ray import tune

    from flexi_workflows.pipeline import STOPPED, check_plan, prepare, run_stages
    from flexi_workflows.placement_groups import reaping_orphaned_train_groups
    from flexi_workflows.ray_cluster import ensure_ray
    from flexi_workflows.report import build_report, format_table
    from flexi_workflows.stages.plan import plan_pipeline
    from flexi_workflows.tasks import get_task
    from flexi_workflows.tracking import Tracker, resolve_tracking_uri

    wall_start = time.time()
    source = recipe_path or "recipe"
    if recipe.sweep is None:
        raise ConfigError(f"{source}: the recipe has no `sweep:` section (space, metric) to sweep over")
    validate_sweep(recipe, to_dict(recipe), source)  # the space, types and metric: before anything else
    recipe = prepare(recipe)  # data parsed, resources, tracking reachable, base model built
    base = to_dict(recipe)
    trials, recipes, settings = validate_sweep(recipe, base, source)
    plans = [plan_pipeline(r) for r in recipes]
    for plan in plans:
        check_plan(plan)
    sweep_dir = Path(recipe.output_dir).resolve()
    # the same trials computing the same stages is the same sweep, whatever the resources or tracking
    sweep_fp = fingerprint({"trials": [[t.trial_id, [s.fingerprint for s in p.stages()]] for t, p in zip(trials, plans)],
                            **settings})
    store, prefix = records_home(recipe, sweep_dir, sweep_fp)
    if not prefix:  # the trials write into the sweep folder itself: every node must see it
        check_sweep_dir_shared(recipe, sweep_dir)
    task_metric = get_task(recipe.task).metric
    sweep_file = sweep_dir / SWEEP_FILE
    previous = json.loads(sweep_file.read_text()) if sweep_file.is_file() else {}
    resuming = switch_trials(sweep_dir, previous.get("fingerprint"), sweep_fp)
    if resuming and previous.get("fingerprint") != sweep_fp:
        previous = json.loads((sweep_dir / f"{SWEEP_FILE}.{sweep_fp}").read_text())

    tracker = None
    parent_id = None
    uri = resolve_tracking_uri(recipe.tracking.tracking_uri, recipe.output_dir) if recipe.tracking.enabled else None
    if uri:
        tracker = Tracker(uri, recipe.tracking.experiment)
        parent_id = previous.get("parent_run_id") if resuming else None
        if parent_id is None:
            parent_id = tracker.start_run(recipe.name, params={**flatten({k: v for k, v in base.items() if k != "sweep"}),
                                                               "sweep.space": recipe.sweep.space,
                                                               "sweep.trials": len(trials)},
                                          tags={"flexi.kind": "sweep", "flexi.sweep_fingerprint": sweep_fp})
            if recipe_path and Path(recipe_path).is_file():
                tracker.log_artifacts(parent_id, Path(recipe_path), "recipe")
        else:
            tracker.client.update_run(parent_id, status="RUNNING")
    state = {"name": recipe.name, "fingerprint": sweep_fp, "parent_run_id": parent_id, **settings,
             "task_metric": task_metric, "lower_is_better": lower_is_better(task_metric),
             "varied": list(recipe.sweep.space), "trials": [{"trial_id": t.trial_id, "overrides": t.overrides} for t in trials],
             "max_concurrent_trials": recipe.sweep.max_concurrent_trials}
    write_json_atomic(sweep_file, state)
    write_json_atomic(sweep_dir / f"{SWEEP_FILE}.{sweep_fp}", state)  # found again if this sweep comes back
    print(f"sweep {recipe.name}: {len(trials)} trials, {recipe.sweep.max_concurrent_trials} at once → {sweep_dir}"
          + (" (resuming)" if resuming else ""))

    ensure_ray(recipe.ray)
    status = "FAILED"
    try:
        # stages several trials share run once, here, before the trials
        shared_start = time.time()
        shared = shared_stages(recipes)
        run_stages(shared, tracker=tracker, parent_id=parent_id)
        shared_seconds = round(time.time() - shared_start, 2)
        if shared:
            print(f"shared stages ({len(shared)}): {', '.join(s.name for s in shared)} — {shared_seconds:.0f} s")

        context = {"records": store.uri, "records_prefix": prefix, "base": base, "source": source, "tracking_uri": uri, "cwd": os.getcwd(),
                   "experiment": recipe.tracking.experiment, "parent_run_id": parent_id, "dataset": settings["dataset"],
                   "fail_trial": os.environ.get(FAIL_TRIAL_ENV), "scheduler": recipe.sweep.scheduler is not None}
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=context),
                                        {"cpu": recipe.sweep.trial_cpus, "memory": 1 << 20})
        scheduler = asha(recipe, recipes)
        # Tune's state beside the records: a restarted driver on another machine restores it from there
        tune_root = store.path(_under(prefix, "tune"))
        tune_fs = store.fs if store.remote else None
        experiment = f"sweep-{sweep_fp}"
        tune_start = time.time()
        if tune.Tuner.can_restore(f"{tune_root}/{experiment}", storage_filesystem=tune_fs):
            tuner = tune.Tuner.restore(f"{tune_root}/{experiment}", trainable, resume_unfinished=True,
                                       restart_errored=True, storage_filesystem=tune_fs)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search([{"trial_id": t.trial_id, "overrides": t.overrides} for t in trials])},
                # with a scheduler, Tune reads the per-epoch val_loss; the best trial is picked below either way
                tune_config=tune.TuneConfig(metric=None if scheduler else settings["metric"],
                                            mode=None if scheduler else settings["mode"], scheduler=scheduler,
                                            max_concurrent_trials=recipe.sweep.max_concurrent_trials),
                run_config=tune.RunConfig(name=experiment, storage_path=tune_root, storage_filesystem=tune_fs,
                                          failure_config=tune.FailureConfig(max_failures=0), verbose=1),
            )
        # a stopped trial's Ray Train controller can die before removing its workers' placement group
        with reaping_orphaned_train_groups() as reaper:
            grid = tuner.fit()
        tune_seconds = round(time.time() - tune_start, 2)

        if prefix:
            mirror_records(store, prefix, sweep_dir, trials)
        records = collect_records(sweep_dir, trials, grid, tracker, parent_id, scheduled=scheduler is not None)
        finished = [r for r in records if r["status"] == "FINISHED"]
        sign = 1 if settings["mode"] == "max" else -1
        best = max(finished, key=lambda r: sign * r["metrics"].get(settings["metric"], float("-inf") * sign)) if finished else None
        trial_seconds = round(sum(r.get("seconds") or 0 for r in records), 2)
        state.update(best={"trial_id": best["trial_id"], "overrides": best["overrides"],
                           settings["metric"]: best["metrics"][settings["metric"]]} if best else None,
                     finished=len(finished), failed=sum(r["status"] == "FAILED" for r in records),
                     stopped=sum(r["status"] == "STOPPED" for r in records),
                     wall_seconds=round(time.time() - wall_start, 2), shared_stage_seconds=shared_seconds,
                     tune_seconds=tune_seconds, trial_seconds_sum=trial_seconds,
                     orphaned_train_groups_removed=len(reaper.removed),
                     tune_overhead_per_trial_s=round(max(0.0, tune_seconds * min(recipe.sweep.max_concurrent_trials, len(trials))
                                                         - trial_seconds) / max(1, len(trials)), 2))
        write_json_atomic(sweep_file, state)
        report = build_report(sweep_dir)
        if tracker:
            if best and best.get("run_id"):
                tracker.set_tags(best["run_id"], {"flexi.best": "true"})
                tracker.set_tags(parent_id, {"flexi.best_trial": best["trial_id"], "flexi.best_run_id": best["run_id"]})
                tracker.log_metrics(parent_id, {f"best.{settings['metric']}": best["metrics"][settings["metric"]]})
            tracker.log_metrics(parent_id, {k: state[k] for k in ("finished", "failed", "wall_seconds", "tune_seconds",
                                                                  "trial_seconds_sum", "tune_overhead_per_trial_s")})
            tracker.log_artifacts(parent_id, sweep_file)
            tracker.log_artifacts(parent_id, sweep_dir / "report", "report")
        print()
        print(format_table(report))
        for r in records:
            if r["status"] != "FINISHED":
                print(f"trial {r['trial_id']} {r['overrides']} {r['status'].lower()}: {r.get('error')}")
        if best:
            print(f"\nbest trial {best['trial_id']} {best['overrides']}: {settings['metric']} = "
                  f"{best['metrics'][settings['metric']]:.4f}")
        print(f"{len(finished)}/{len(records)} trials finished; wall {state['wall_seconds']:.0f} s "
              f"(shared stages {shared_seconds:.0f} s, trials {tune_seconds:.0f} s; sum of trial times {trial_seconds:.0f} s)"
              f"\nreport → {sweep_dir / 'report'}")
        status = "FINISHED" if finished else "FAILED"
        return state
    except STOPPED:  # Ctrl-C, SIGTERM: stopped by its user, as a run's are
        status = "KILLED"
        raise
    finally:
        if tracker:
            tracker.end(parent_id, status)


def switch_trials(sweep_dir: Path, current: str | None, wanted: str) -> bool:
    """Make <sweep_dir>/trials/ hold the records of sweep `wanted`; True when it has some to resume.

    Another sweep's records (another space, base recipe or metric in the same output_dir) are moved
    aside to trials-<its fingerprint>/ and come back if that sweep is run again, so the report only
    ever reads the records of the sweep it describes."""
    trials_dir = sweep_dir / TRIALS
    if current == wanted:
        return trials_dir.is_dir()
    if trials_dir.is_dir():
        aside = sweep_dir / f"{TRIALS}-{current or 'unknown'}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(trials_dir, aside)
    earlier = sweep_dir / f"{TRIALS}-{wanted}"
    if earlier.is_dir() and (sweep_dir / f"{SWEEP_FILE}.{wanted}").is_file():
        os.replace(earlier, trials_dir)
        return True
    return False


def collect_records(sweep_dir: Path, trials: list[Trial], grid, tracker=None, parent_id: str | None = None,
                    scheduled: bool = False) -> list[dict]:
    """The trials' own records. A trial with none was stopped by the scheduler (no error) or lost by
    Tune (an error); it is recorded here, and its MLflow run closed, from Tune's result."""
    results = {}
    for result in grid:
        trial_id = (result.config or {}).get("trial", {}).get("trial_id")
        if trial_id:
            results[trial_id] = result
    records = []
    for trial in trials:
        path = sweep_dir / TRIALS / f"{trial.trial_id}.json"
        result = results.get(trial.trial_id)
        if path.is_file():
            record = json.loads(path.read_text())
            stopped = scheduled and result is not None and result.error is None and record["status"] == "FAILED"
            if not stopped:  # (a stopped trial's training fails as it is torn down: Tune's view wins)
                records.append(record)
                continue
        error = result.error if result is not None else "Tune has no result for this trial"
        if error is None and not scheduled:
            error = "the trial ended without writing its record (was the sweep folder on storage every node shares?)"
        record = {"trial_id": trial.trial_id, "overrides": trial.overrides}
        if error is None:
            epoch = (result.metrics or {}).get("epoch")
            record.update(status="STOPPED", error=f"stopped early by the scheduler at epoch {epoch}",
                          val_loss=(result.metrics or {}).get("val_loss"))
        else:
            record.update(status="FAILED", error=str(error)[:5000])
        if tracker is not None:
            run_id = tracker.find_child(parent_id, {"flexi.trial_id": trial.trial_id})
            if run_id is not None:
                record["run_id"] = run_id
                tracker.set_tags(run_id, {"flexi.error": record["error"]})
                tracker.end(run_id, "KILLED" if error is None else "FAILED")
        write_json_atomic(path, record)
        records.append(record)
    return records
