"""Test helpers shared across test modules: small recipes and recorded stage artifacts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq

from flexi_workflows.recipes import Recipe
from flexi_workflows.recipes.loader import build


def write_math_set(path: Path, n: int, *, marked: bool = True) -> Path:
    """`n` addition problems; with `marked`, odd rows mention zebras (the 'hard' ones in fake scoring)."""
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 10, (i // 10) % 10
            word = ("zebra" if i % 2 else "apple") if marked else "item"
            f.write(json.dumps({"question": f"The {word} has {a} plus {b}?", "answer": f"{a}+{b}={a + b}. #### {a + b}"}) + "\n")
    return path


def small_recipe(tmp_path: Path, model_dir: Path, overrides: list[str] | None = None, **sections) -> Recipe:
    return build(Recipe, small_recipe_data(tmp_path, model_dir, **sections), overrides=overrides or [])


def small_recipe_data(tmp_path: Path, model_dir: Path, **sections) -> dict:
    """A tiny recipe as plain data: 64 training and 12 eval addition problems, Flexi (2,8), ZeRO-2."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = write_math_set(tmp_path / "train.jsonl", 64)
    evals = write_math_set(tmp_path / "eval.jsonl", 12)
    data = {
        "name": "test",
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(model_dir)},
        "task": {"name": "math", "train": {"path": str(train)}, "eval": [{"name": "mini", "path": str(evals)}],
                 "max_prompt_tokens": 64, "max_target_tokens": 24},
        "method": {"name": "flexi", "ranks": [2, 8], "dropout": 0.0},
        "scoring": {"max_new_tokens": 8, "batch_size": 16},
        "router": {"epochs": 30},
        "training": {"epochs": 1, "lr": 0.01, "micro_batch_size": 4, "log_every": 1, "warmup_ratio": 0.0,
                     "schedule": "constant"},
        "distribution": {"num_workers": 1, "strategy": "deepspeed", "zero_stage": 2},
        "evaluation": {"batch_size": 12, "max_new_tokens": 8},
        "tracking": {"enabled": False},
    }
    for key, value in sections.items():
        if key == "method":  # another method has other fields: replace, keeping dropout off for adapters
            data[key] = value if value.get("name") == "full" else {"dropout": 0.0, **value}
        else:
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def record_scores(recipe: Recipe) -> None:
    """Record score artifacts with known classes ('apple' rows right, 'zebra' rows wrong).

    A random tiny model gets every row wrong, which leaves one class empty; the stages exchange data
    only through these recorded files, so the downstream stages run for real on top of them. The
    recorded stage has the real score stage's inputs, so it lands in the very folder the real one
    would use and the pipeline finds it finished.
    """
    from flexi_workflows.stages.base import StageOutput, run_stage
    from flexi_workflows.stages.score import SCORED, STATS, ScoreStage, build_scored_table
    from flexi_workflows.tasks import get_task

    class RecordedScores(ScoreStage):
        def run(self, tmp, upstream, context):
            rows = get_task("math").load(self.recipe.task.train)
            outputs = {r["id"]: {"prompt": r["question"],
                                 "prediction": r["target"] if "apple" in r["question"] else "#### -1"} for r in rows}
            table, stats = build_scored_table(rows, outputs, self.recipe)
            pq.write_table(table, tmp / SCORED)
            (tmp / STATS).write_text(json.dumps(stats))
            return StageOutput(metrics={"scored_rows": len(rows)}, artifacts=[STATS])

    run_stage(RecordedScores(recipe))


def score_and_route(recipe: Recipe) -> None:
    """Recorded scores (see record_scores), then the real route stage on top of them."""
    from flexi_workflows.stages.route import run_route

    record_scores(recipe)
    run_route(recipe)


class WarningsSeen(logging.Handler):
    """The messages of the WARNING-or-above records a logger passed on (add it as a handler)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
