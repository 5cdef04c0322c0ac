"""Oracle routing: a perfect router built from the scored classes — the upper bound on routing."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flexi_workflows.pipeline import run_stages
from flexi_workflows.stages.base import StageOutput, run_stage
from flexi_workflows.stages.evaluate import METRICS, PREDICTIONS, EvalStage
from flexi_workflows.stages.plan import plan_pipeline
from flexi_workflows.stages.train import training_examples
from flexi_workflows.tasks import get_task
from tests.helpers import record_scores, small_recipe

ORACLE = {"name": "flexi", "ranks": [2, 8], "router": "oracle"}


def record_base_eval(recipe) -> None:
    """A base evaluation whose graded answers are known: 'apple' items right, 'zebra' items wrong (the
    oracle reads only these recorded files, as it would read a real base evaluation)."""

    class RecordedBaseEval(EvalStage):
        def run(self, tmp, upstream, context):
            (tmp / PREDICTIONS).mkdir()
            datasets = {}
            for source in self.recipe.task.eval:
                rows = get_task("math").load(source)
                right = [1.0 if "apple" in r["question"] else 0.0 for r in rows]
                pq.write_table(pa.table({"id": [r["id"] for r in rows], "accuracy": right}),
                               tmp / PREDICTIONS / f"{source.label}.parquet")
                datasets[source.label] = {"accuracy": sum(right) / len(right), "mean_active_params": 0}
            (tmp / METRICS).write_text(json.dumps({"method": "base", "ranks": [], "params": {}, "datasets": datasets}))
            return StageOutput(metrics={})

    run_stage(RecordedBaseEval(recipe, None))


def test_oracle_plans_no_router_and_reads_the_base_evaluation(tmp_path, tiny_model_dir):
    recipe = small_recipe(tmp_path, tiny_model_dir, method=ORACLE, evaluation={"include_base": False})
    plan = plan_pipeline(recipe)
    names = [s.name for s in plan.stages()]
    assert plan.route.name not in names
    assert names[:2] == [plan.score.name, plan.base_eval.name]  # the oracle needs both, even without include_base
    method = plan.methods[0]
    assert method.label == "flexi-2-8-oracle"
    assert method.train.upstream == [plan.score] and plan.base_eval in method.eval.upstream


@pytest.mark.slow
def test_oracle_assigns_exactly_the_scored_classes_ranks(tmp_path, tiny_model_dir, ray_local):
    recipe = small_recipe(tmp_path, tiny_model_dir, method=ORACLE, training={"max_steps": 2})
    record_scores(recipe)
    record_base_eval(recipe)
    plan = plan_pipeline(recipe)
    results = run_stages(plan.stages())

    train_rows = get_task("math").load(recipe.task.train)
    examples, info = training_examples(recipe, plan.methods[0].train.method, results[plan.score.name])
    assert [e["rank"] for e in examples] == [2 if "apple" in r["question"] else 8 for r in train_rows]
    assert info["routing"]["rank_shares"] == {"2": 0.5, "8": 0.5}

    eval_rows = get_task("math").load(recipe.task.eval[0])
    used = pq.read_table(Path(results[plan.methods[0].eval.name].folder) / PREDICTIONS / "mini.parquet").to_pydict()
    expected = {r["id"]: 2 if "apple" in r["question"] else 8 for r in eval_rows}
    assert dict(zip(used["id"], used["rank"])) == expected
