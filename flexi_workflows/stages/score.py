"""Stage 1, score: the base model answers every training sample on Ray Data, the task metric grades
each answer, and the grades become difficulty classes (paper §3 "Router": F1 for QA, accuracy for math).
With scoring.num_samples = k > 1 the model samples k answers per row and the score is their mean
grade (math: the pass rate j/k), which is what lets thresholds make more than two math classes.

    rows (validated here) ──► ray.data.from_items ──► map_batches(BatchGenerator, actor pool)
        ──► prediction per row ──► task.score ──► assign_classes ──► <output_dir>/score/<fingerprint>/
                                                                     scored.parquet, stats.json, manifest.json

The fingerprint covers what changes the grades (data file contents, model weights, prompt length,
generation and class settings) but not how many actors run it, so a rerun or another sweep trial
with the same inputs reuses the folder instead of generating again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flexi_workflows.errors import ConfigError
from flexi_workflows.recipes.schema import Recipe
from flexi_workflows.scoring.difficulty import assign_classes, class_stats, sampled_classes, score_histogram
from flexi_workflows.stages.base import Stage, StageContext, StageOutput, StageResult, recipe_storage, run_stage
from flexi_workflows.stages.inputs import data_inputs, dataset_record, model_inputs, task_inputs
from flexi_workflows.tasks import Row, get_task, metric_key, subset_of

log = logging.getLogger(__name__)

SCORED = "scored.parquet"
STATS = "stats.json"


def validate_score_inputs(recipe: Recipe) -> list[Row]:
    """Everything that can be checked before Ray starts: task, data (parsed in full), model reference."""
    from flexi_workflows.models.loading import load_config

    if recipe.task.train is None:
        raise ConfigError("task.train is not set: the score stage needs a training set (path or hub name)")
    if not recipe.model.name_or_path:
        raise ConfigError("model.name_or_path is not set")
    task = get_task(recipe.task)
    rows = task.load(recipe.task.train)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{recipe.task.train.path or recipe.task.train.name}: row ids are not unique")
    load_config(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    return rows


def model_columns(row: Row) -> dict:
    """What a generation actor needs of a row: its id and the model's input (question / context, or audio)."""
    if "audio" in row:
        return {"id": row["id"], "audio": row["audio"]}
    return {"id": row["id"], "question": row["question"], "context": str(row.get("context") or "")}


def score_rows(rows: list[Row], recipe: Recipe) -> dict[str, dict]:
    """Predictions for `rows` from a Ray Data actor pool; returns id → {prompt, prediction}."""
    import ray

    from flexi_workflows.generation import BatchGenerator
    from flexi_workflows.progress import with_progress
    from flexi_workflows.ray_cluster import whole_actor_pools

    cfg = recipe.scoring
    columns = [model_columns(r) for r in rows]
    # blocks of one batch each: the actor pool pulls work in batch-sized units
    ds = ray.data.from_items(columns, override_num_blocks=max(1, -(-len(columns) // cfg.batch_size)))
    ds = ds.map_batches(
        BatchGenerator,
        fn_constructor_kwargs={
            "model_ref": recipe.model.name_or_path,
            "task_name": recipe.task,
            "max_new_tokens": cfg.max_new_tokens,
            "max_prompt_tokens": recipe.task.max_prompt_tokens,
            "date_string": recipe.task.date_string,
            "num_samples": cfg.num_samples,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "seed": cfg.seed,
            "dtype": recipe.model.dtype,
            "trust_remote_code": recipe.model.trust_remote_code,
            "num_threads": max(1, int(cfg.cpus_per_actor)),
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
    )
    outputs = {}
    ds = whole_actor_pools(ds)
    ds.context.enable_progress_bars = False  # one line per progress event instead (progress.py)
    for r in with_progress(ds.iter_rows(), len(columns), "score"):
        out = {"prompt": str(r["prompt"]), "prediction": str(r["prediction"])}
        if cfg.sampling:
            out["samples"] = json.loads(str(r["samples"]))
        outputs[str(r["id"])] = out
    return outputs


def build_scored_table(rows: list[Row], outputs: dict[str, dict], recipe: Recipe) -> tuple[pa.Table, dict]:
    task = get_task(recipe.task)
    missing = [r["id"] for r in rows if r["id"] not in outputs]
    if missing:
        raise RuntimeError(f"scoring lost {len(missing)} rows, e.g. {missing[:3]}")
    cfg = recipe.scoring
    predictions = [outputs[r["id"]]["prediction"] for r in rows]
    if cfg.sampling:  # k graded samples per row → pass rate → class
        samples = [outputs[r["id"]].get("samples") or [] for r in rows]
        bad = [r["id"] for r, s in zip(rows, samples) if len(s) != cfg.num_samples]
        if bad:
            raise RuntimeError(f"scoring.num_samples={cfg.num_samples} but rows came back with other counts, e.g. {bad[:3]}")
        grades = [[task.score(p, r) for p in s] for s, r in zip(samples, rows)]
        scores, classes = sampled_classes(grades, cfg.thresholds)
    else:
        scores = np.array([task.score(p, r) for p, r in zip(predictions, rows)], dtype=np.float64)
        classes = assign_classes(scores, cfg.thresholds, higher_is_better=task.higher_is_better)
    names = cfg.class_names
    columns = {
        "id": [r["id"] for r in rows],
        "source": [r.get("source", "") for r in rows],
        "subset": [subset_of(r) for r in rows],
        "question": [r["question"] for r in rows],
        "context": [r.get("context", "") for r in rows],
        "prompt": [outputs[r["id"]]["prompt"] for r in rows],
        "target": [r["target"] for r in rows],
        "answers": [list(r["answers"]) for r in rows],
        "prediction": predictions,
        "score": scores,
        "class": classes,
        "class_name": [names[k] for k in classes],
    }
    if rows and "audio" in rows[0]:  # speech: the route stage pools the audio; groups are clean / other
        columns["audio"] = [r["audio"] for r in rows]
        columns["group"] = [r.get("group", "") for r in rows]
    if cfg.sampling:
        columns["samples"] = samples
        columns["sample_scores"] = grades
    table = pa.table(columns)
    stats = class_stats(classes, names, scores)
    stats.update({"metric": task.metric, "thresholds": cfg.thresholds, "mean_score": float(scores.mean()),
                  "num_samples": cfg.num_samples, "subsets": subset_stats(rows, scores, classes, len(names))})
    if cfg.sampling and task.metric == "accuracy":
        stats["pass_rate_histogram"] = score_histogram(scores, cfg.num_samples)
    return table, stats


def subset_stats(rows: list[Row], scores: np.ndarray, classes: np.ndarray, num_classes: int) -> dict[str, dict]:
    """Per subset (MRQA's training sets, MetaMathQA's types): rows, mean score and rows per class —
    the record of what the training mix really held."""
    keys = np.asarray([subset_of(r) for r in rows])
    out = {}
    for key in sorted(set(keys.tolist())):
        mask = keys == key
        out[key] = {"rows": int(mask.sum()), "mean_score": float(scores[mask].mean()),
                    "class_counts": np.bincount(classes[mask], minlength=num_classes).tolist()}
    return out


class ScoreStage(Stage):
    kind = "score"
    files = [SCORED, STATS]

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe_storage(recipe))
        self.recipe = recipe
        self._rows: list[Row] | None = None

    def inputs(self) -> dict:
        cfg = self.recipe.scoring
        return {
            "task": task_inputs(self.recipe),
            "data": data_inputs(self.recipe.task.train),
            "model": model_inputs(self.recipe.model),
            "scoring": {"batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens,
                        "thresholds": cfg.thresholds, "class_names": cfg.class_names, "num_samples": cfg.num_samples,
                        # the sampling settings change nothing when the one answer is greedy
                        **({"temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed} if cfg.sampling else {})},
        }

    def datasets(self) -> list[dict]:
        return [dataset_record(self.recipe.task.train, "scoring")]

    def rows(self) -> list[Row]:
        if self._rows is None:
            self._rows = validate_score_inputs(self.recipe)
        return self._rows

    def check(self) -> None:
        self.rows()

    def run(self, tmp: Path, upstream: dict, context: StageContext) -> StageOutput:
        from flexi_workflows.ray_cluster import ensure_ray

        rows = self.rows()
        ensure_ray(self.recipe.ray)
        started = time.time()
        outputs = score_rows(rows, self.recipe)
        table, stats = build_scored_table(rows, outputs, self.recipe)
        stats["seconds"] = round(time.time() - started, 2)
        pq.write_table(table, tmp / SCORED)
        (tmp / STATS).write_text(json.dumps(stats, indent=2) + "\n")
        log.info("score: %d rows, classes %s", len(rows), [c["count"] for c in stats["classes"]])
        if "pass_rate_histogram" in stats:
            log.info("score: rows per pass rate over %d samples %s", stats["num_samples"], stats["pass_rate_histogram"])
        log.info("score: rows per subset %s", {k: v["rows"] for k, v in stats["subsets"].items()})
        metrics = {f"class_share_{c['name']}": c["share"] for c in stats["classes"]}
        metrics.update({"scored_rows": stats["total"], "mean_score": stats["mean_score"]})
        for key, sub in stats["subsets"].items():
            metrics[f"subset_rows.{metric_key(key)}"] = sub["rows"]
            metrics[f"subset_mean_score.{metric_key(key)}"] = sub["mean_score"]
        params = {f"scoring.{k}": v for k, v in dataclasses.asdict(self.recipe.scoring).items()}
        return StageOutput(metrics=metrics, params=params, artifacts=[STATS])


def run_score(recipe: Recipe, *, force: bool = False) -> StageResult:
    """Run (or reuse) the score stage."""
    stage = ScoreStage(recipe)
    stage.check()
    return run_stage(stage, force=force)
