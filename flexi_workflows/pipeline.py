"""`flexi run`: score → route → train → evaluate for every method of a recipe, then a summary.

The recipe becomes a stage graph (stages/plan.py) whose folders are named by their inputs, so
rerunning a recipe redoes only what a change touches: a new router σ retrains the router and the
Flexi models, not the baselines; a new eval set re-evaluates, nothing else. Every stage — computed
or reused — is an MLflow child run of one pipeline run, logged the same way. The summary
(`summary.json`, a table on stdout, MLflow, a Pareto plot) compares the methods on each eval set.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexi_workflows.errors import ConfigError
from flexi_workflows.fsutil import write_json_atomic
from flexi_workflows.metrics import lower_is_better
from flexi_workflows.recipes.loader import flatten, to_dict
from flexi_workflows.recipes.schema import DataSource, Recipe
from flexi_workflows.stages.base import Stage, StageResult, exclusive_run, recipe_storage
from flexi_workflows.stages.plan import Plan, plan_pipeline
from flexi_workflows.storage import Storage, is_remote, scratch_dir

if TYPE_CHECKING:
    from flexi_workflows.tracking import Tracker

log = logging.getLogger(__name__)
SUMMARY = "summary.json"
RECIPE = "recipe.json"  # the recipe as run (paths absolute, built-in models resolved): `flexi export` reads it


def prepare(recipe: Recipe, *, need_eval: bool = True) -> Recipe:
    """Resolve a built-in base model (building it once) and validate inputs before Ray starts.
    `need_eval=False`: a stage command that reads no evaluation set (score, route, train)."""
    from flexi_workflows.ray_cluster import check_multi_node
    from flexi_workflows.stages.train import check_resources
    from flexi_workflows.tracking import check_tracking_uri, resolve_tracking_uri

    if recipe.task.train is None:
        raise ConfigError("task.train is not set")
    if need_eval and not recipe.task.eval:
        raise ConfigError("task.eval lists no evaluation sets")
    from flexi_workflows.tasks import get_task

    task = get_task(recipe.task)
    recipe = resolve_builtin_data(recipe)  # a built-in corpus is synthesized (once) so it can be read
    keyed = [("task.train", recipe.task.train), *((f"task.eval.{i}", s) for i, s in enumerate(recipe.task.eval))]
    for key, source in keyed:
        check_unique_ids(task.load(source), key)  # parse everything now: a bad line fails here, not mid-pipeline
    check_resources(recipe)
    if recipe.distribution.strategy == "deepspeed":
        from flexi_workflows.training.engines import deepspeed_config_for

        deepspeed_config_for(recipe)  # distribution.deepspeed_config's file read and merged: a conflict fails here
    recipe = absolute_paths(recipe)
    storage = recipe_storage(recipe)
    try:
        storage.check_writable()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{'storage' if recipe.storage else 'output_dir'}: {exc}") from None
    recipe = resolve_model(recipe)
    check_model(recipe)
    # last: a sqlite tracking store is created by its check
    uri = resolve_tracking_uri(recipe.tracking.tracking_uri, recipe.output_dir) if recipe.tracking.enabled else None
    if uri:
        check_tracking_uri(uri)
    check_multi_node(recipe.ray, storage, uri)  # joining a cluster of several nodes: shared storage and tracking
    from flexi_workflows.memory import warn_if_over

    warn_if_over(recipe)  # a warning, never an error: only when the GPUs' memory is known (memory.py)
    return recipe


def check_unique_ids(rows: list[dict], key: str) -> None:
    """Scores and predictions are matched to rows by id: two rows with one id would share one answer."""
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        rid = str(row["id"])
        if rid in seen:
            raise ConfigError(f"{key}: rows {seen[rid]} and {i} have the same id {rid!r}; scores and predictions are "
                              f"matched to rows by id, so every row needs its own")
        seen[rid] = i


def check_weights(ref: str) -> None:
    """A local model folder's safetensors files are whole: each header parses and the data it declares is
    there (a truncated download otherwise fails inside a Ray actor, in a page of Ray's output)."""
    import json
    import struct

    folder = Path(ref)
    if not folder.is_dir():
        return  # a hub name or a storage URI: transformers' own errors name it
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ConfigError(f"model.name_or_path: {folder} has no *.safetensors weights"
                          + (f" (only {', '.join(others)}: pickled weights are not loaded; convert them to safetensors, "
                             f"e.g. with transformers' save_pretrained(..., safe_serialization=True))" if others
                             else "; copy the whole model folder (config, tokenizer and model.safetensors)"))
    for file in files:
        size = file.stat().st_size
        try:
            with open(file, "rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                if header_len > size - 8:
                    raise ValueError(f"its header claims {header_len:,} bytes of a {size:,}-byte file")
                header = json.loads(handle.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end > size:
                raise ValueError(f"its tensors need {8 + header_len + end:,} bytes, the file has {size:,}")
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            raise ConfigError(f"model.name_or_path: {file} is not a whole safetensors file ({exc}); "
                              f"download or copy it again") from None


def check_model(recipe: Recipe) -> None:
    """The base model's tokenizer (or speech processor) loads and every adapter method's targets name
    linear layers it has — on the meta device, in seconds, instead of after scoring has run."""
    from flexi_workflows.adapters.model import find_target_linears, resolve_targets
    from flexi_workflows.errors import TargetModuleError
    from flexi_workflows.methods import get_method
    from flexi_workflows.models.loading import build_on_meta, load_config, load_processor, load_tokenizer
    from flexi_workflows.tasks import get_task

    ref, remote_code = recipe.model.name_or_path, recipe.model.trust_remote_code
    check_weights(ref)
    if get_task(recipe.task).modality == "speech":
        load_processor(ref, trust_remote_code=remote_code)
    else:
        load_tokenizer(ref, trust_remote_code=remote_code)
    model = None
    for config in recipe.methods:
        targets = getattr(config, "targets", None)
        if config.name == "full":
            continue
        model = model if model is not None else build_on_meta(load_config(ref, trust_remote_code=remote_code))
        try:
            find_target_linears(model, resolve_targets(model, targets))
        except TargetModuleError as exc:
            raise ConfigError(f"method {get_method(config).label}: targets: {exc}") from None


def absolute_paths(recipe: Recipe, root: str | Path | None = None) -> Recipe:
    """The recipe with its local paths made absolute (relative ones taken from `root`, default the
    working directory): Ray workers and Tune trials run in other working directories. Fingerprints do
    not change (data and models are fingerprinted by content)."""
    base = Path(root) if root is not None else Path.cwd()

    def absolute(path: str | None) -> str | None:
        return str((base / Path(path).expanduser()).resolve()) if path else path

    def source(s):
        return dataclasses.replace(s, path=absolute(s.path)) if s is not None else None

    model = recipe.model
    if (base / Path(model.name_or_path).expanduser()).exists():
        model = dataclasses.replace(model, name_or_path=absolute(model.name_or_path))
    model = dataclasses.replace(model, cache_dir=absolute(model.cache_dir))
    task = dataclasses.replace(recipe.task, train=source(recipe.task.train), eval=[source(s) for s in recipe.task.eval])
    training = dataclasses.replace(recipe.training, resume=absolute(recipe.training.resume))
    return dataclasses.replace(recipe, output_dir=absolute(recipe.output_dir), model=model, task=task, training=training)


def resolve_builtin_data(recipe: Recipe) -> Recipe:
    """The recipe with built-in corpora (`name: builtin:spoken-tiny`) given their cached folder as `path`
    (synthesized on first use); the name stays, so reports still call the set by it."""
    def source(s: DataSource | None) -> DataSource | None:
        if s is None or s.path or not (s.name or "").startswith("builtin:"):
            return s
        from flexi_workflows.audio.corpus import resolve_builtin_corpus

        return dataclasses.replace(s, path=str(resolve_builtin_corpus(s.name, recipe.model.cache_dir)))

    task = dataclasses.replace(recipe.task, train=source(recipe.task.train), eval=[source(s) for s in recipe.task.eval])
    return dataclasses.replace(recipe, task=task)


def resolve_model(recipe: Recipe) -> Recipe:
    """The recipe with a built-in base model replaced by its cached folder (built on first use), and
    built-in corpora by theirs."""
    from flexi_workflows.models.loading import load_config
    from flexi_workflows.models.pretrain import builtin_spec, resolve_builtin

    recipe = resolve_builtin_data(recipe)
    if builtin_spec(recipe.model.name_or_path) is not None:
        folder = resolve_builtin(recipe.model.name_or_path, recipe.model.cache_dir)
        storage = recipe_storage(recipe)
        if storage.remote:  # built here, read by workers and actors on every node: they fetch it from storage
            folder = publish_model(storage, Path(folder))
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name_or_path=str(folder)))
    load_config(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    return recipe


# how a run is stopped by its user: Ctrl-C (KeyboardInterrupt), SIGTERM (`kill`, `ray job stop`, a scheduler:
# SystemExit from the handler ray.init installs)
STOPPED = (KeyboardInterrupt, SystemExit)
MLFLOW_MISSED = "mlflow_missed.json"  # what a run could not record while its tracking server was away
PUBLISHED = ".published"  # written last into a model folder copied to storage: the copy is whole


def publish_model(storage: Storage, folder: Path) -> str:
    """A locally built model folder copied to `<storage>/models/<name>` once (a marker object, written last,
    says the copy is whole); its storage reference."""
    rel = f"models/{folder.name}"
    if not storage.exists(f"{rel}/{PUBLISHED}"):
        storage.delete(rel)
        storage.upload(folder, rel)
        storage.write_bytes(f"{rel}/{PUBLISHED}", b"")
    return storage.ref(rel)


def describe_base_eval(folder: str, record: dict) -> str:
    """One line on what the built-in base model can do before any fine-tuning (recorded when it was built)."""
    if "wer_all" in record:  # the tiny Whisper: WER per test split
        parts = " / ".join(f"{g} {100 * record[f'wer_{g}']:.1f} %" for g in ("clean", "other", "all") if f"wer_{g}" in record)
        return f"base model {folder}: WER on the built-in corpus's test splits {parts}"
    levels = ", ".join(f"L{level} {100 * acc:.1f} %" for level, acc in record.get("accuracy_by_level", {}).items())
    return (f"base model {folder}: {record['rows']} {record['split']} problems, accuracy easy "
            f"{100 * record['accuracy_easy']:.1f} % / hard {100 * record['accuracy_hard']:.1f} % / all "
            f"{100 * record['accuracy_all']:.1f} % ({levels})")


def check_plan(plan: Plan) -> list[Stage]:
    """The stages to run, each checked (data parsed, resources, model config) before any of them runs."""
    stages = plan.stages()
    for stage in stages:
        stage.check()
    return stages


def summary_rows(plan: Plan, results: dict[str, StageResult]) -> tuple[list[dict[str, Any]], str]:
    """One row per method × eval set, read from the eval stages' recorded metrics."""
    from flexi_workflows.stages.evaluate import METRICS
    from flexi_workflows.tasks import get_task

    task = get_task(plan.recipe.task)
    metric = task.metric
    sources = {s.label: s for s in plan.recipe.task.eval}
    evals = ([plan.base_eval] if plan.base_eval.name in results else []) + [m.eval for m in plan.methods]
    router = None
    if plan.route.name in results:
        router = {f"router_{k}": v for k, v in results[plan.route.name].metrics.items()
                  if k == "holdout_accuracy" or k.startswith("holdout_recall_")}
    rows = []
    for stage in evals:
        result = results[stage.name]
        recorded = result.read_json(METRICS)
        params = recorded.get("params") or {}
        for name, summary in recorded["datasets"].items():
            mean_active = summary.get("mean_active_params")
            histogram = summary.get("rank_histogram")
            row = {
                "method": stage.label,
                "dataset": name,
                # which copy / split this is, where it is not the paper's (e.g. MultiArith's 600-item copy)
                "note": task.note(sources[name], summary.get("count")) if name in sources else None,
                "ranks": recorded.get("ranks", []),
                "fingerprint": result.fingerprint,
                f"{metric}_all": summary.get(metric),
                "mean_active_params": mean_active,
                "params_pct_of_lora8": (100 * mean_active / params["lora8_params"]) if mean_active is not None and params.get("lora8_params") else None,
                "params_pct_of_base": (100 * mean_active / params["base_params"]) if mean_active is not None and params.get("base_params") else None,
                "high_rank_rate": summary.get("high_rank_rate"),
                "trainable_params": params.get("trainable_params"),
                "mean_rank": summary.get("mean_rank"),
                "rank_shares": {k: v / sum(histogram.values()) for k, v in histogram.items()} if histogram else None,
            }
            for key, value in summary.items():
                if (key.startswith(f"{metric}_") and key != f"{metric}_all") or key.startswith("high_rank_rate_"):
                    row[key] = value
            for extra in task.summary_metrics or ():  # speech: cer and acc beside wer, overall and per group
                if extra != metric and extra in summary:
                    row[f"{extra}_all"] = summary[extra]
                    row.update({k: v for k, v in summary.items() if k.startswith(f"{extra}_") and not k.startswith("count")})
            if router is not None and stage.method is not None and stage.method.needs_router:
                row.update(router)  # the router it was routed by: held-out accuracy and recall per class
            if "exact_match" in summary:
                row["exact_match_all"] = summary["exact_match"]
            rows.append(row)
    return rows, metric


def dataset_notes(rows: list[dict]) -> dict[str, str]:
    """Dataset → its note, for the datasets of `rows` that have one."""
    return {r["dataset"]: r["note"] for r in rows if r.get("note")}


def print_table(rows: list[dict], metric: str, score_stats: dict | None) -> None:
    groups = sorted({k[len(metric) + 1:] for r in rows for k in r if k.startswith(f"{metric}_") and k != f"{metric}_all"})
    header = f"{'method':<14}{'dataset':<12}" + "".join(f"{metric[:3] + ' ' + g:>11}" for g in groups)
    header += f"{metric[:3] + ' all':>10}{'mean active':>13}{'% LoRA-8':>10}{'→ high rank':>12}"
    print()
    print(header)
    for r in rows:
        line = f"{r['method']:<14}{r['dataset']:<12}"
        line += "".join(f"{100 * r[f'{metric}_{g}']:>10.1f}%" if r.get(f"{metric}_{g}") is not None else f"{'-':>11}" for g in groups)
        line += f"{100 * r[f'{metric}_all']:>9.1f}%" if r.get(f"{metric}_all") is not None else f"{'-':>10}"
        line += f"{r['mean_active_params']:>13,.0f}" if r.get("mean_active_params") is not None else f"{'-':>13}"
        line += f"{r['params_pct_of_lora8']:>9.1f}%" if r.get("params_pct_of_lora8") is not None else f"{'-':>10}"
        line += f"{100 * r['high_rank_rate']:>11.1f}%" if r.get("high_rank_rate") is not None else f"{'-':>12}"
        print(line)
    notes = dataset_notes(rows)
    if notes:
        print()
        for dataset, note in notes.items():
            print(f"{dataset}: {note}")
    if score_stats:
        shares = ", ".join(f"{c['name']} {100 * c['share']:.1f} %" for c in score_stats["classes"])
        print(f"\nscored training data: {score_stats['total']} rows; difficulty classes: {shares}")


def merge_datasets(records: list[dict]) -> list[dict]:
    """Each dataset once, with every context it was read in ("scoring, training"): MLflow keeps one input
    per dataset and run, so the same file logged again under another context would be dropped."""
    merged: dict[tuple, dict] = {}
    for d in records:
        key = (d["name"], d["digest"])
        if key in merged:
            if d["context"] not in merged[key]["context"].split(", "):
                merged[key]["context"] += f", {d['context']}"
        else:
            merged[key] = dict(d)
    return list(merged.values())


def log_trained_model(tracker, run_id: str, result: StageResult, register: str | None = None) -> str:
    """A train stage's artifact as an MLflow logged model — its one copy in MLflow (the run lists it as its
    output model), once per fingerprint: a rerun's run links the existing one — registered as a version
    of model `register` when given; returns the model id."""
    from flexi_workflows.stages.train import ARTIFACT

    tags = {"flexi.fingerprint": result.fingerprint}
    model_id = tracker.find_model(tags)
    if model_id is None:  # computed now, or earlier without tracking: the stage folder has it
        model_id = tracker.log_model(run_id, result.label, result.folder / ARTIFACT, model_type="flexi-workflows",
                                     tags={**tags, "flexi.method": result.label, "flexi.folder": result.location})
    tracker.set_tags(run_id, {"flexi.model_id": model_id, "flexi.model_uri": f"models:/{model_id}"})
    if register:
        version = tracker.register(model_id, register, run_id=run_id, tags={**tags, "flexi.method": result.label})
        tracker.set_tags(run_id, {"flexi.registered_model": f"models:/{register}/{version}"})
    return model_id


def run_stages(stages: list[Stage], *, tracker=None, parent_id: str | None = None, force: bool = False,
               report_to_tune: str | None = None, register: tuple[str, str] | None = None,
               banners: bool = False) -> dict[str, StageResult]:
    """Run (or reuse) `stages` in order; each becomes an MLflow child run of `parent_id`, with the data it
    read as input datasets, and a train stage's artifact as a logged model. The stage named
    `report_to_tune` (a sweep trial's main training) forwards its per-epoch reports to Tune; `register`
    (stage name, model name) registers that train stage's model."""
    from flexi_workflows.stages.base import StageContext, run_stage
    from flexi_workflows.stages.train import ARTIFACT as TRAINED_ARTIFACT

    results: dict[str, StageResult] = {}
    for number, stage in enumerate(stages, 1):
        if banners:  # where a long run is, between the stages' own progress lines
            print(f"── [{number}/{len(stages)}] {stage.name} " + "─" * max(3, 60 - len(stage.name)), flush=True)
        started = time.time()
        run_id = tracker.start_run(stage.name, parent_id=parent_id, tags={"flexi.kind": stage.kind}) if tracker else None
        if tracker:
            tracker.log_datasets(run_id, stage.datasets())
        context = StageContext(tracker.uri if tracker else None, run_id, report_to_tune=stage.name == report_to_tune)
        try:
            result = run_stage(stage, force=force, context=context)
        except BaseException as exc:
            if tracker:  # Ctrl-C / SIGTERM: stopped by its user, as MLflow records it (KILLED), not failed
                tracker.end(run_id, "KILLED" if isinstance(exc, STOPPED) else "FAILED")
            raise
        if tracker:
            tracker.log_stage(run_id, result, curves_logged=not result.cached,
                              skip=(TRAINED_ARTIFACT,) if stage.kind == "train" else ())
            if stage.kind == "train":
                log_trained_model(tracker, run_id, result, register[1] if register and register[0] == stage.name else None)
            tracker.end(run_id)
        results[stage.name] = result
        if banners:
            print(f"   {stage.name}: " + (f"reused {result.location}" if result.cached
                                          else f"done in {time.time() - started:.0f} s → {result.location}"), flush=True)
    return results


def save_missed(tracker: Tracker, folder: str | Path) -> str:
    """Write the calls MLflow did not record to `folder`/mlflow_missed.json, beside the run's summary: a local
    folder, or a sweep trial's summary folder in storage (s3://...), which is written through a scratch copy.
    Returns where it is, for the warning."""
    if is_remote(str(folder)):
        with scratch_dir("missed") as tmp:
            tracker.save_missed(tmp / MLFLOW_MISSED)
            Storage(str(folder)).upload(tmp, "")
        return Storage(str(folder)).display(MLFLOW_MISSED)
    tracker.save_missed(Path(folder) / MLFLOW_MISSED)
    return str(Path(folder) / MLFLOW_MISSED)


def run_pipeline(recipe: Recipe, *, recipe_path: str | None = None, force: bool = False, tracker=None,
                 parent_id: str | None = None, summary_dir: str | Path | None = None, quiet: bool = False,
                 report_to_tune: str | None = None) -> dict:
    """The whole recipe. A sweep trial passes its own tracker, parent run, summary folder and the
    stage whose per-epoch reports go to Tune. A run of its own holds output_dir's run lock: a second
    `flexi run` on the same folder is refused, naming the first."""
    from flexi_workflows.fsutil import fingerprint

    recipe_hash = fingerprint(to_dict(recipe))  # the recipe as given, before paths and built-ins are resolved
    recipe = prepare(recipe)
    kwargs = {"recipe_path": recipe_path, "force": force, "tracker": tracker, "parent_id": parent_id,
              "summary_dir": summary_dir, "quiet": quiet, "report_to_tune": report_to_tune, "recipe_hash": recipe_hash}
    if summary_dir is None and report_to_tune is None:  # a run of its own (sweep trials share stage folders)
        with exclusive_run(recipe_storage(recipe), "storage" if recipe.storage else "output_dir"):
            return _run_prepared(recipe, **kwargs)
    return _run_prepared(recipe, **kwargs)


def _run_prepared(recipe: Recipe, *, recipe_path: str | None, force: bool, tracker, parent_id: str | None,
                  summary_dir: str | Path | None, quiet: bool, report_to_tune: str | None, recipe_hash: str) -> dict:
    from flexi_workflows.models.pretrain import read_base_eval
    from flexi_workflows.plots import pareto_plot
    from flexi_workflows.ray_cluster import ensure_ray
    from flexi_workflows.recipes.loader import to_dict
    from flexi_workflows.stages.score import STATS
    from flexi_workflows.tracking import Tracker, resolve_tracking_uri

    plan = plan_pipeline(recipe)
    stages = check_plan(plan)
    base_record = read_base_eval(recipe.model.name_or_path)
    if base_record and not quiet:
        print(describe_base_eval(recipe.model.name_or_path, base_record))
    own_parent = False
    if tracker is None and recipe.tracking.enabled:
        tracker = Tracker(resolve_tracking_uri(recipe.tracking.tracking_uri, recipe.output_dir), recipe.tracking.experiment)
        tracker.close_abandoned()
    if tracker is not None and parent_id is None:
        parent_id = tracker.start_run(recipe.name, params=flatten(recipe),
                                      tags={"flexi.kind": "pipeline", "flexi.recipe_hash": recipe_hash})
        own_parent = True
        tracker.log_datasets(parent_id, merge_datasets([d for stage in stages for d in stage.datasets()]))
        if recipe_path and Path(recipe_path).is_file():
            tracker.log_artifacts(parent_id, Path(recipe_path), "recipe")
    ensure_ray(recipe.ray)
    status = "FAILED"
    try:
        # `flexi run` registers its main method's artifact; a sweep's trials register nothing
        register = (plan.methods[0].train.name, recipe.tracking.register_as) \
            if own_parent and recipe.tracking.register_as and plan.methods else None
        results = run_stages(stages, tracker=tracker, parent_id=parent_id, force=force, report_to_tune=report_to_tune,
                             register=register, banners=not quiet)
        rows, metric = summary_rows(plan, results)
        score_stats = results[plan.score.name].read_json(STATS) if plan.score.name in results else None
        summary = {"recipe": recipe.name, "metric": metric, "lower_is_better": lower_is_better(metric), "rows": rows,
                   "dataset_notes": dataset_notes(rows),
                   "scored_class_shares": {c["name"]: c["share"] for c in score_stats["classes"]} if score_stats else None,
                   "stages": {name: {"fingerprint": r.fingerprint, "folder": r.location, "cached": r.cached,
                                     "seconds": r.manifest.get("seconds")} for name, r in results.items()}}
        if base_record:
            summary["base_model_eval"] = base_record
        if plan.needs_router:
            summary["router_holdout_accuracy"] = results[plan.route.name].metrics.get("holdout_accuracy")
        storage = Storage(summary_dir) if summary_dir else recipe_storage(recipe)
        with (nullcontext(storage.local) if not storage.remote else scratch_dir("summary")) as out:
            write_json_atomic(out / SUMMARY, summary)
            write_json_atomic(out / RECIPE, to_dict(recipe))
            pareto_plot(rows, out / "pareto.png", metric=f"{metric}_all", lower_is_better=lower_is_better(metric))
            if storage.remote:
                storage.upload(out, "")
            if tracker is not None:
                tracker.log_artifacts(parent_id, out / SUMMARY)
                tracker.log_artifacts(parent_id, out / "pareto.png", "plots")
                if own_parent:  # a sweep trial's run gets its own method's metrics from the sweep instead
                    for r in rows:
                        tracker.log_metrics(parent_id, {f"{r['method']}.{r['dataset']}.{k}": v for k, v in r.items()})
        if not quiet:
            print_table(rows, metric, score_stats)
        status = "FINISHED"
        return summary
    except STOPPED:
        status = "KILLED"
        raise
    finally:
        if tracker is not None and own_parent:
            tracker.end(parent_id, status)
        if tracker is not None and tracker.missed:  # the run went on without the server: say what it lacks
            missed = save_missed(tracker, summary_dir or recipe.output_dir)
            log.warning("MLflow did not record %d call(s) (the server at %s was away): their values are in %s; "
                        "the results themselves are complete in the stage folders and summary.json",
                        len(tracker.missed), tracker.uri, missed)
