"""`flexi run`: score → route → train → evaluate for every method of a recipe, then a summary.

Each stage skips itself when its recorded inputs are unchanged (stages/common.py), so rerunning a
recipe redoes only what a change touches: a new router σ retrains the router and the Flexi models,
not the baselines; a new eval set re-evaluates, nothing else. Every stage is an MLflow child run of
one pipeline run. The summary (`<output_dir>/summary.json`, a table on stdout, MLflow, a Pareto
plot) compares the methods on each eval set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from flexi_workflows.errors import ConfigError
from flexi_workflows.fsutil import write_json_atomic
from flexi_workflows.recipes.schema import Recipe

log = logging.getLogger(__name__)
SUMMARY = "summary.json"


def prepare(recipe: Recipe) -> Recipe:
    """Resolve a built-in base model (building it once) and validate inputs before Ray starts."""
    from flexi_workflows.stages.train import check_resources
    from flexi_workflows.tracking import check_tracking

    if recipe.task.train is None:
        raise ConfigError("task.train is not set")
    if not recipe.task.eval:
        raise ConfigError("task.eval lists no evaluation sets")
    from flexi_workflows.tasks import get_task

    task = get_task(recipe.task.name)
    task.load(recipe.task.train)  # parse everything now: a bad line fails here, not mid-pipeline
    for source in recipe.task.eval:
        task.load(source)
    check_resources(recipe)
    if recipe.tracking.enabled:
        check_tracking(recipe)
    labels = [label_of(m) for m in recipe.methods]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"method and compare name the same method twice: {labels}")
    return resolve_model(recipe)


def resolve_model(recipe: Recipe) -> Recipe:
    """The recipe with a built-in base model replaced by its cached folder (built on first use)."""
    from flexi_workflows.models.loading import load_config
    from flexi_workflows.models.pretrain import builtin_spec, resolve_builtin

    if builtin_spec(recipe.model.name_or_path) is not None:
        folder = resolve_builtin(recipe.model.name_or_path, recipe.model.cache_dir)
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name_or_path=folder))
    load_config(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    return recipe


def label_of(method) -> str:
    from flexi_workflows.training.methods import method_label

    return method_label(method)


def summary_rows(recipe: Recipe) -> tuple[list[dict[str, Any]], dict]:
    from flexi_workflows.stages.evaluate import METRICS
    from flexi_workflows.stages.evaluate import stage_dir as eval_dir

    from flexi_workflows.stages.evaluate import BASE

    rows = []
    metric = "accuracy" if recipe.task.name in ("math", "arith") else "f1"
    entries = [(BASE, None)] if recipe.evaluation.include_base else []
    entries += [(label_of(m), m) for m in recipe.methods]
    for label, method in entries:
        results = json.loads((eval_dir(recipe, label) / METRICS).read_text())
        params = results.get("params") or {}
        for name, summary in results["datasets"].items():
            mean_active = summary.get("mean_active_params")
            row = {
                "method": label,
                "dataset": name,
                "ranks": method.ranks if method is not None and method.name != "full" else [],
                f"{metric}_all": summary.get(metric),
                "mean_active_params": mean_active,
                "params_pct_of_lora8": (100 * mean_active / params["lora8_params"]) if mean_active is not None and params else None,
                "params_pct_of_base": (100 * mean_active / params["base_params"]) if mean_active is not None and params else None,
                "high_rank_rate": summary.get("high_rank_rate"),
                "mean_rank": summary.get("mean_rank"),
            }
            for key, value in summary.items():
                if key.startswith(f"{metric}_") and key != f"{metric}_all":
                    row[key] = value
            if "exact_match" in summary:
                row["exact_match_all"] = summary["exact_match"]
            rows.append(row)
    return rows, {"metric": metric}


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
    if score_stats:
        shares = ", ".join(f"{c['name']} {100 * c['share']:.1f} %" for c in score_stats["classes"])
        print(f"\nscored training data: {score_stats['total']} rows; difficulty classes: {shares}")


def run_pipeline(recipe: Recipe, *, recipe_path: str | None = None, force: bool = False) -> dict:
    from flexi_workflows.ray_cluster import ensure_ray
    from flexi_workflows.stages.evaluate import run_base_eval, run_eval
    from flexi_workflows.stages.route import REPORT as ROUTE_REPORT
    from flexi_workflows.stages.route import run_route
    from flexi_workflows.stages.score import STATS, run_score
    from flexi_workflows.stages.train import run_train
    from flexi_workflows.tracking import Tracker

    recipe = prepare(recipe)
    tracker = Tracker(recipe) if recipe.tracking.enabled else None
    parent = tracker.start_parent() if tracker else None
    if tracker:
        tracker.log_recipe(parent, recipe_path)
    ensure_ray(recipe.ray)
    status = "FAILED"
    try:
        needs_router = any(m.name == "flexi" for m in recipe.methods)
        score_stats = None
        if needs_router:
            score_out = run_score(recipe, force=force)
            score_stats = json.loads((score_out / STATS).read_text())
            route_out = run_route(recipe, force=force)
            if tracker:
                run_id = tracker.child("score", {"scoring." + k: v for k, v in dataclasses.asdict(recipe.scoring).items()})
                tracker.log_metrics(run_id, {f"class_share_{c['name']}": c["share"] for c in score_stats["classes"]}
                                    | {"scored_rows": score_stats["total"], "mean_score": score_stats["mean_score"]})
                tracker.log_artifacts(run_id, score_out / STATS)
                tracker.end(run_id)
                run_id = tracker.child("route", {"router." + k: v for k, v in dataclasses.asdict(recipe.router).items()})
                report = json.loads((route_out / ROUTE_REPORT).read_text())
                tracker.log_metrics(run_id, {"holdout_accuracy": report["holdout"]["accuracy"],
                                             **{f"holdout_recall_{k}": v for k, v in report["holdout"]["per_class_recall"].items() if v is not None}})
                tracker.log_artifacts(run_id, route_out / "router", "router")
                tracker.log_artifacts(run_id, route_out / ROUTE_REPORT)
                tracker.end(run_id)
        if recipe.evaluation.include_base:
            run_base_eval(recipe, force=force)
        for method in recipe.methods:
            run_train(recipe, method, tracking=tracker, force=force)
            run_eval(recipe, method, tracking=tracker, force=force)
        rows, info = summary_rows(recipe)
        summary = {"recipe": recipe.name, "metric": info["metric"], "rows": rows,
                   "scored_class_shares": {c["name"]: c["share"] for c in score_stats["classes"]} if score_stats else None}
        out = Path(recipe.output_dir)
        write_json_atomic(out / SUMMARY, summary)
        from flexi_workflows.plots import pareto_plot

        pareto_plot(rows, out / "pareto.png", metric=f"{info['metric']}_all")
        if tracker:
            tracker.log_artifacts(parent, out / SUMMARY)
            tracker.log_artifacts(parent, out / "pareto.png", "plots")
            for r in rows:
                tracker.log_metrics(parent, {f"{r['method']}.{r['dataset']}.{k}": v for k, v in r.items()
                                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
        print_table(rows, info["metric"], score_stats)
        status = "FINISHED"
        return summary
    finally:
        if tracker:
            tracker.end_all(status)
