"""Stage 4, evaluate: batched generation on Ray Data with each trained method, scored the paper's way.

    eval rows ──► flexi: router rank per row ──► ray.data map_batches(MethodGenerator, actor pool)
              ──► predictions + ranks used ──► task metrics per row ──► per-dataset means
              ──► <output_dir>/eval/<label>/ metrics.json, predictions/<dataset>.parquet

Metrics per eval set: accuracy (math) or F1 and EM (QA), per `group` when rows carry one (the
quickstart's easy/hard), the mean rank actually used, and mean active parameters
(params per rank × mean rank for the LoRA family; the final budget for AdaLoRA; all weights for full).
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
from flexi_workflows.recipes.schema import MethodConfig, Recipe
from flexi_workflows.stages.common import cached_output, manifest_fingerprint, publish_stage
from flexi_workflows.stages.train import ARTIFACT, data_fingerprint
from flexi_workflows.stages.train import stage_dir as train_dir
from flexi_workflows.tasks import Row, get_task

log = logging.getLogger(__name__)

METRICS = "metrics.json"
PREDICTIONS = "predictions"
BASE = "base"


def stage_dir(recipe: Recipe, label: str) -> Path:
    return Path(recipe.output_dir) / "eval" / label


def eval_fingerprint(recipe: Recipe, method: MethodConfig, label: str) -> dict:
    from flexi_workflows.stages.route import stage_dir as route_dir

    inputs = {
        "stage": "eval",
        "train": manifest_fingerprint(train_dir(recipe, label)),
        "datasets": [data_fingerprint(s) for s in recipe.task.eval],
        "evaluation": dataclasses.asdict(recipe.evaluation),
        "seed": recipe.seed,
    }
    if method.name == "flexi":
        inputs["router"] = manifest_fingerprint(route_dir(recipe))
    return inputs


def param_accounting(recipe: Recipe, method: MethodConfig, artifact: Path) -> dict[str, Any]:
    from flexi_workflows.adapters.accounting import count_base_params, params_per_rank
    from flexi_workflows.adapters.model import resolve_targets
    from flexi_workflows.models.loading import build_on_meta, load_config

    meta = build_on_meta(load_config(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code))
    base = count_base_params(meta)
    targets = resolve_targets(meta, method.targets)
    per_rank = params_per_rank(meta, targets)
    out = {"base_params": base, "params_per_rank": per_rank, "lora8_params": per_rank * 8}
    if method.name == "full":
        out["trainable_params"] = base
    elif method.name == "adalora":
        info = json.loads((artifact / "method.json").read_text())
        out["trainable_params"] = info.get("active_params")
        out["adalora_active_params"] = info.get("active_params")
    else:
        out["trainable_params"] = per_rank * method.r_max
    return out


def summarize(task_name: str, rows: list[Row], outputs: dict[str, dict], accounting: dict, method: MethodConfig) -> tuple[dict, pa.Table]:
    task = get_task(task_name)
    per_row = []
    for row in rows:
        out = outputs[row["id"]]
        per_row.append({**task.metrics(out["prediction"], row), "rank": int(out["rank"]), "group": row.get("group", "")})
    metric_names = list(per_row[0]) if per_row else []
    metric_names = [m for m in metric_names if m not in ("rank", "group")]
    summary: dict[str, Any] = {m: float(np.mean([r[m] for r in per_row])) for m in metric_names}
    summary["count"] = len(rows)
    groups = defaultdict(list)
    for r in per_row:
        if r["group"]:
            groups[r["group"]].append(r)
    for name, members in sorted(groups.items()):
        for m in metric_names:
            summary[f"{m}_{name}"] = float(np.mean([r[m] for r in members]))
        summary[f"count_{name}"] = len(members)
    ranks = np.array([r["rank"] for r in per_row])
    if method.name in ("lora", "dylora", "dylora_plus", "flexi"):
        mean_rank = float(ranks.mean())
        summary["mean_rank"] = mean_rank
        summary["mean_active_params"] = accounting["params_per_rank"] * mean_rank
        summary["high_rank_rate"] = float((ranks == method.r_max).mean())
        summary["rank_histogram"] = {str(int(k)): int(v) for k, v in zip(*np.unique(ranks, return_counts=True))}
    elif method.name == "adalora":
        summary["mean_active_params"] = accounting.get("adalora_active_params")
    else:
        summary["mean_active_params"] = accounting["base_params"]
    table = pa.table({
        "id": [r["id"] for r in rows],
        "prediction": [outputs[r["id"]]["prediction"] for r in rows],
        "answers": [list(r["answers"]) for r in rows],
        "group": [r.get("group", "") for r in rows],
        "rank": ranks.astype(np.int64),
        **{m: [p[m] for p in per_row] for m in metric_names},
    })
    return summary, table


def generate_with_method(rows: list[Row], recipe: Recipe, method: MethodConfig | None, artifact: Path | None) -> dict[str, dict]:
    """Predictions (and ranks used) for `rows`; method None evaluates the base model itself."""
    import ray

    from flexi_workflows.scoring.evaluation import MethodGenerator
    from flexi_workflows.scoring.generation import BatchGenerator

    cfg = recipe.evaluation
    columns = [{"id": r["id"], "question": r["question"], "context": r.get("context", ""), "rank": int(r.get("rank", 0))}
               for r in rows]
    ds = ray.data.from_items(columns, override_num_blocks=max(1, -(-len(columns) // cfg.batch_size)))
    kwargs = {
        "model_ref": recipe.model.name_or_path, "task_name": recipe.task.name,
        "max_new_tokens": cfg.max_new_tokens, "max_prompt_tokens": recipe.task.max_prompt_tokens,
        "dtype": recipe.model.dtype, "trust_remote_code": recipe.model.trust_remote_code,
        "num_threads": max(1, int(cfg.cpus_per_actor)),
    }
    if method is not None:
        kwargs.update({"method": dataclasses.asdict(method), "artifact_dir": str(artifact), "seed": recipe.seed})
    ds = ds.map_batches(
        MethodGenerator if method is not None else BatchGenerator,
        fn_constructor_kwargs=kwargs,
        batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor,
    )
    return {str(r["id"]): {"prediction": str(r["prediction"]), "rank": int(r.get("rank", 0))} for r in ds.iter_rows()}


def run_eval(recipe: Recipe, method: MethodConfig, *, tracking: Any = None, force: bool = False) -> Path:
    from flexi_workflows.ray_cluster import ensure_ray
    from flexi_workflows.training.methods import method_label

    label = method_label(method)
    if not recipe.task.eval:
        raise ConfigError("task.eval lists no evaluation sets")
    artifact = train_dir(recipe, label) / ARTIFACT
    if not artifact.is_dir():
        raise ConfigError(f"{artifact}: no trained {label}; run `flexi train` with this recipe first")
    task = get_task(recipe.task.name)
    datasets = [(source.label, task.load(source)) for source in recipe.task.eval]
    out_dir = stage_dir(recipe, label)
    inputs = eval_fingerprint(recipe, method, label)
    if not force and cached_output(out_dir, inputs) is not None:
        log.info("eval %s: inputs unchanged, reusing %s", label, out_dir)
        return out_dir
    accounting = param_accounting(recipe, method, artifact)
    ensure_ray(recipe.ray)
    results: dict[str, Any] = {"method": label, "ranks": method.ranks, "params": accounting, "datasets": {}}
    tables = {}
    for name, rows in datasets:
        if method.name == "flexi":
            from flexi_workflows.router.apply import route_texts
            from flexi_workflows.stages.route import ROUTER_DIR
            from flexi_workflows.stages.route import stage_dir as route_dir

            _, ranks = route_texts([task.user_text(r) for r in rows], route_dir(recipe) / ROUTER_DIR,
                                   recipe.model.name_or_path, method.ranks, max_length=recipe.task.max_prompt_tokens,
                                   trust_remote_code=recipe.model.trust_remote_code)
            rows = [{**r, "rank": int(k)} for r, k in zip(rows, ranks)]
        outputs = generate_with_method(rows, recipe, method, artifact)
        summary, table = summarize(recipe.task.name, rows, outputs, accounting, method)
        results["datasets"][name] = summary
        tables[name] = table
        log.info("eval %s on %s: %s", label, name, {k: v for k, v in summary.items() if isinstance(v, float)})
    with publish_stage(out_dir, inputs, [METRICS, PREDICTIONS]) as tmp:
        (tmp / PREDICTIONS).mkdir()
        for name, table in tables.items():
            pq.write_table(table, tmp / PREDICTIONS / f"{name}.parquet")
        (tmp / METRICS).write_text(json.dumps(results, indent=2) + "\n")
    if tracking is not None:
        tracking.log_eval(label, method, out_dir, results, recipe)
    return out_dir


def run_base_eval(recipe: Recipe, *, force: bool = False) -> Path:
    """The base model itself on the eval sets: the reference every fine-tune is read against."""
    from flexi_workflows.models.loading import model_fingerprint
    from flexi_workflows.ray_cluster import ensure_ray

    task = get_task(recipe.task.name)
    datasets = [(source.label, task.load(source)) for source in recipe.task.eval]
    out_dir = stage_dir(recipe, BASE)
    inputs = {"stage": "eval-base", "model": {**dataclasses.asdict(recipe.model), **model_fingerprint(recipe.model.name_or_path)},
              "datasets": [data_fingerprint(s) for s in recipe.task.eval], "evaluation": dataclasses.asdict(recipe.evaluation),
              "task": recipe.task.name}
    if not force and cached_output(out_dir, inputs) is not None:
        return out_dir
    ensure_ray(recipe.ray)
    results: dict[str, Any] = {"method": BASE, "ranks": [], "datasets": {}}
    tables = {}
    base_method = MethodConfig(name="full")
    for name, rows in datasets:
        outputs = generate_with_method(rows, recipe, None, None)
        summary, table = summarize(recipe.task.name, rows, outputs, {"base_params": 0}, base_method)
        summary["mean_active_params"] = 0
        results["datasets"][name] = summary
        tables[name] = table
        log.info("eval base model on %s: %s", name, {k: v for k, v in summary.items() if isinstance(v, float)})
    with publish_stage(out_dir, inputs, [METRICS, PREDICTIONS]) as tmp:
        (tmp / PREDICTIONS).mkdir()
        for name, table in tables.items():
            pq.write_table(table, tmp / PREDICTIONS / f"{name}.parquet")
        (tmp / METRICS).write_text(json.dumps(results, indent=2) + "\n")
    return out_dir
