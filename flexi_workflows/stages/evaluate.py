"""Stage 4, evaluate: batched generation on Ray Data with each trained method, scored the paper's way.

    eval rows ──► methods that route: rank per row (stages/routing.py) ──► ray.data map_batches(
              MethodGenerator, actor pool) ──► predictions + ranks used ──► task metrics per row
              ──► per-dataset means ──► <output_dir>/eval/<label>-<fingerprint>/ metrics.json, predictions/

Metrics per eval set: accuracy (math), F1 and EM (QA) or corpus-level WER / CER / ACC (speech), per `group` when rows carry one (the
quickstart's easy/hard), the mean rank actually used, and mean active parameters from the ranks
actually used (the method's own accounting). `base` evaluates the untouched base model: the
reference row every fine-tune is read against.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flexi_workflows.errors import ConfigError
from flexi_workflows.methods import Accounting, Method, get_method
from flexi_workflows.plots import rank_histogram_plot
from flexi_workflows.recipes.schema import MethodConfig, Recipe, TaskConfig
from flexi_workflows.stages.base import (
    Stage,
    StageContext,
    StageOutput,
    StageResult,
    recipe_storage,
    run_stage,
)
from flexi_workflows.stages.inputs import data_inputs, dataset_record, model_inputs, task_inputs
from flexi_workflows.stages.train import ARTIFACT
from flexi_workflows.storage import child_path
from flexi_workflows.tasks import Row, get_task

log = logging.getLogger(__name__)

METRICS = "metrics.json"
PREDICTIONS = "predictions"
BASE = "base"


def base_accounting(recipe: Recipe, targets: list[str] | None = None) -> Accounting:
    from flexi_workflows.adapters.accounting import count_base_params, params_per_rank
    from flexi_workflows.adapters.model import resolve_targets
    from flexi_workflows.models.loading import build_on_meta, load_config

    meta = build_on_meta(load_config(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code))
    return Accounting(base_params=count_base_params(meta), params_per_rank=params_per_rank(meta, resolve_targets(meta, targets)))


def summarize(task_name: str | TaskConfig, rows: list[Row], outputs: dict[str, dict]) -> tuple[dict, pa.Table, np.ndarray]:
    """Per-dataset means of the task's metrics (overall and per group), the per-row table, the ranks used."""
    task = get_task(task_name)
    per_row = []
    for row in rows:
        out = outputs[row["id"]]
        per_row.append({**task.metrics(out["prediction"], row), "rank": int(out["rank"]), "group": row.get("group", "")})
    metric_names = [m for m in (list(per_row[0]) if per_row else []) if m not in ("rank", "group")]
    metric_rows = [{m: r[m] for m in metric_names} for r in per_row]
    summary: dict[str, Any] = task.aggregate(metric_rows)  # means, or corpus-level rates (speech)
    summary["count"] = len(rows)
    groups = defaultdict(list)
    for r, only_metrics in zip(per_row, metric_rows):
        if r["group"]:
            groups[r["group"]].append(only_metrics)
    for name, members in sorted(groups.items()):
        for m, value in task.aggregate(members).items():
            summary[f"{m}_{name}"] = value
        summary[f"count_{name}"] = len(members)
    ranks = np.array([r["rank"] for r in per_row], dtype=np.int64)
    table = pa.table({
        "id": [r["id"] for r in rows],
        "prediction": [outputs[r["id"]]["prediction"] for r in rows],
        "answers": [list(r["answers"]) for r in rows],
        "group": [r.get("group", "") for r in rows],
        "rank": ranks,
        **{m: [p[m] for p in per_row] for m in metric_names},
    })
    for key in ("eval_stream", "stream_position"):  # which eval batch a row was in (DyLoRA+ draws one rank per batch)
        if rows and all(key in outputs[r["id"]] for r in rows):
            table = table.append_column(key, pa.array([outputs[r["id"]][key] for r in rows], type=pa.int64()))
    return summary, table, ranks


def eval_batches(n: int, batch_size: int, num_streams: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The deterministic batching of n eval rows: row i is in batch b = i // batch_size; batch b goes to
    shard (stream) b % num_streams at place b // num_streams in it. Returns (batch, stream, position) per row.

    The evaluation runs one shard per actor (num_streams = evaluation.num_actors): DyLoRA+ draws each
    batch's rank from its shard's stream (adapters/policies.py), so the ranks depend on the seed and the
    number of actors only — not on which actor Ray Data hands a batch to, nor in what order.
    """
    batch = np.arange(n, dtype=np.int64) // batch_size
    return batch, batch % num_streams, batch // num_streams


def generate_with_method(rows: list[Row], recipe: Recipe, method: Method | None, artifact: str | Path | None) -> dict[str, dict]:
    """Predictions, ranks used and each row's eval stream / place in it; method None evaluates the base model.
    `artifact` is a reference each actor fetches on its own node (storage.fetch): a path or a storage URI."""
    import ray

    from flexi_workflows.generation import BatchGenerator, MethodGenerator
    from flexi_workflows.progress import with_progress
    from flexi_workflows.ray_cluster import whole_actor_pools
    from flexi_workflows.stages.score import model_columns

    cfg = recipe.evaluation
    if not rows:
        return {}
    progress_label = f"eval {method.label if method is not None else 'base'}"
    merged = cfg.merged and method is not None and method.merges_ranks
    if merged and method.routing is not None:
        # the rows' ranks are known before generation: batches of one rank each (but at the seams) run on the
        # bare base modules with that rank merged, where a mixed batch adds its other ranks' corrections
        rows = sorted(rows, key=lambda r: int(r["rank"]))
    _, stream, position = eval_batches(len(rows), cfg.batch_size, cfg.num_actors)
    columns = [{**model_columns(r), "rank": int(r.get("rank", 0)), "eval_stream": int(k), "stream_position": int(p)}
               for r, k, p in zip(rows, stream, position)]
    # one block per eval batch, so the batches an actor generates are exactly these (one DyLoRA+ rank each)
    blocks = [pa.Table.from_pylist(columns[i:i + cfg.batch_size]) for i in range(0, len(columns), cfg.batch_size)]
    ds = ray.data.from_arrow(blocks)
    kwargs = {
        "model_ref": recipe.model.name_or_path, "task_name": recipe.task,
        "max_new_tokens": cfg.max_new_tokens, "max_prompt_tokens": recipe.task.max_prompt_tokens,
        "date_string": recipe.task.date_string,
        "dtype": recipe.model.dtype, "trust_remote_code": recipe.model.trust_remote_code,
        "num_threads": max(1, int(cfg.cpus_per_actor)),
    }
    if method is not None:
        kwargs.update({"method": dataclasses.asdict(method.config), "artifact_dir": str(artifact), "seed": recipe.seed,
                       "merged": merged})
    ds = ds.map_batches(
        MethodGenerator if method is not None else BatchGenerator,
        fn_constructor_kwargs=kwargs,
        batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor,
    )
    where = {str(c["id"]): (c["eval_stream"], c["stream_position"]) for c in columns}
    outputs = {}
    ds = whole_actor_pools(ds)  # every actor asked for takes part, on whichever node
    ds.context.enable_progress_bars = False  # one line per progress event instead (progress.py)
    for r in with_progress(ds.iter_rows(), len(columns), progress_label):
        key = str(r["id"])
        outputs[key] = {"prediction": str(r["prediction"]), "rank": int(r.get("rank", 0)),
                        "eval_stream": where[key][0], "stream_position": where[key][1]}
    return outputs


def warn_over_window(recipe: Recipe, rows: list[Row], label: str) -> None:
    """Speech: say how many evaluation utterances are longer than the model's window (their audio is cut
    to it, so their transcripts lose words); evaluation keeps every item, as the benchmark defines it."""
    seconds = [r.get("seconds") or 0.0 for r in rows if "audio" in r]
    if not seconds:
        return
    from flexi_workflows.models.loading import load_processor

    window = float(load_processor(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
                   .feature_extractor.chunk_length)
    over = sum(s > window for s in seconds)
    if over:
        log.warning("eval on %s: %d of %d utterances are longer than the model's %g-second window; only their "
                    "first %g s are transcribed", label, over, len(seconds), window, window)


class EvalStage(Stage):
    """Evaluate one trained method (upstream: its train stage, and the stage its routing reads: the
    route stage, or the base evaluation for the oracle) or, with `method=None`, the base model itself."""

    kind = "eval"
    files = [METRICS, PREDICTIONS]

    def __init__(self, recipe: Recipe, method: MethodConfig | None, train: Stage | None = None,
                 route: Stage | None = None, base_eval: Stage | None = None) -> None:
        self.method = get_method(method) if method is not None else None
        self.train = train
        routing = self.method.routing if self.method is not None else None
        self.route = {"learned": route, "oracle": base_eval, None: None}[routing]
        if routing is not None and self.route is None:
            raise ConfigError(f"{self.method.label} routes by difficulty: it needs the "
                              f"{'route' if routing == 'learned' else 'base eval'} stage")
        super().__init__(recipe_storage(recipe), [s for s in (train, self.route) if s is not None])
        self.recipe = recipe
        self.label = self.method.label if self.method is not None else BASE

    def inputs(self) -> dict:
        recipe, cfg = self.recipe, self.recipe.evaluation
        inputs = {
            "task": task_inputs(recipe),
            "datasets": [data_inputs(s) for s in recipe.task.eval],
            "evaluation": {"batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens},
        }
        if self.method is None:
            inputs["model"] = model_inputs(recipe.model)  # a method's model is in its train stage's fingerprint
        else:
            inputs["method"] = dataclasses.asdict(self.method.config)  # settings used at inference (eval_rank)
            if self.method.eval_ranks_from_streams:
                # DyLoRA+: one rank stream per actor, so the number of actors changes which rank a batch gets
                inputs["evaluation"]["eval_streams"] = cfg.num_actors
            if cfg.merged and self.method.merges_ranks and recipe.model.dtype != "float32":
                # in fp32 merged and unmerged generation differ only in float association (the same tokens,
                # tests/adapters/test_merged.py); a 16-bit merged weight is rounded once more, which flips
                # greedy tokens on near-ties: another result, so another stage
                inputs["evaluation"]["merged"] = True
        return inputs

    def datasets(self) -> list[dict]:
        return [dataset_record(s, "evaluation") for s in self.recipe.task.eval]

    def check(self) -> None:
        if not self.recipe.task.eval:
            raise ConfigError("task.eval lists no evaluation sets")
        task = get_task(self.recipe.task)
        for source in self.recipe.task.eval:
            task.load(source)

    def run(self, tmp: Path, upstream: dict[str, StageResult], context: StageContext) -> StageOutput:
        from flexi_workflows.ray_cluster import ensure_ray
        from flexi_workflows.stages.routing import assign_ranks

        recipe, method = self.recipe, self.method
        task = get_task(recipe.task)
        trained = upstream[self.train.name] if self.train is not None else None
        artifact = trained.folder / ARTIFACT if trained is not None else None  # this machine's copy, for accounting
        route = upstream[self.route.name] if self.route is not None else None
        accounting = base_accounting(recipe, method.targets if method else None)
        params = {"base_params": accounting.base_params, "params_per_rank": accounting.params_per_rank,
                  # "% of LoRA-8" compares adapters on the same targets; full fine-tuning has none, and
                  # the model type's default targets would make its share mean something else
                  "lora8_params": (accounting.lora8_params if method is None or hasattr(method.config, "targets")
                                   else None),
                  "trainable_params": method.trainable_params(accounting, artifact) if method else 0}
        ensure_ray(recipe.ray)
        results: dict[str, Any] = {"method": self.label, "ranks": method.ranks if method else [], "params": params,
                                   "datasets": {}}
        (tmp / PREDICTIONS).mkdir()
        for source in recipe.task.eval:
            rows = task.load(source)
            warn_over_window(recipe, rows, source.label)
            if route is not None:
                ranks, _ = assign_ranks(recipe, method, rows, route, dataset=source.label)
                rows = [{**r, "rank": int(k)} for r, k in zip(rows, ranks)]
            outputs = generate_with_method(rows, recipe, method, trained.ref(ARTIFACT) if trained is not None else None)
            summary, table, ranks_used = summarize(recipe.task, rows, outputs)
            if method is None:
                summary["mean_active_params"] = 0
            else:
                summary.update(method.active_params(accounting, artifact, ranks_used))
                if method.reports_ranks:  # how often each group's items got the top rank (routing per group)
                    groups = np.asarray([r.get("group", "") for r in rows])
                    for group in sorted(set(groups.tolist()) - {""}):
                        summary[f"high_rank_rate_{group}"] = float((ranks_used[groups == group] == max(method.ranks)).mean())
            results["datasets"][source.label] = summary
            pq.write_table(table, child_path(tmp / PREDICTIONS, f"{source.label}.parquet"))
            log.info("eval %s on %s: %s", self.label, source.label,
                     {k: round(v, 4) for k, v in summary.items() if isinstance(v, float)})
        (tmp / METRICS).write_text(json.dumps(results, indent=2) + "\n")
        artifacts = [METRICS, PREDICTIONS]
        for name, summary in results["datasets"].items():
            if summary.get("rank_histogram"):
                rank_histogram_plot(summary["rank_histogram"], tmp / f"ranks_{name}.png", title=f"{self.label} on {name}")
                artifacts.append(f"ranks_{name}.png")
        metrics = {k: v for k, v in params.items() if isinstance(v, (int, float))}
        for name, summary in results["datasets"].items():
            metrics.update({f"{name}.{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
            if summary.get("mean_active_params") is not None and accounting.base_params:
                metrics[f"{name}.mean_active_params_pct_of_base"] = 100 * summary["mean_active_params"] / accounting.base_params
        return StageOutput(metrics=metrics, params={"method.label": self.label}, artifacts=artifacts)


def run_eval(recipe: Recipe, method: MethodConfig | None, *, force: bool = False) -> StageResult:
    """Evaluate (or reuse) one method — its train stage must be finished — or the base model (None)."""
    from flexi_workflows.stages.plan import plan_pipeline

    plan = plan_pipeline(recipe)
    stage = plan.eval_stage(method) if method is not None else plan.base_eval
    stage.check()
    return run_stage(stage, force=force)
