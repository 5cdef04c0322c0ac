"""evaluation.merged through the evaluation stage's Ray Data actor pool: the routed rows sorted by rank into
batches, each generated merged (one call per batch), give the unmerged predictions of the mixed-rank batches (tiny fp32
LLaMA, a Flexi adapter with nonzero B)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flexi_workflows.methods import get_method
from flexi_workflows.stages.evaluate import generate_with_method
from flexi_workflows.tasks import get_task
from tests.conftest import randomize_lora
from tests.helpers import small_recipe

pytestmark = pytest.mark.slow


def test_merged_evaluation_gives_the_unmerged_predictions(tmp_path, tiny_model_dir, ray_local):
    from flexi_workflows.generation import MethodGenerator
    from flexi_workflows.models.loading import load_model

    evaluation = {"batch_size": 6, "max_new_tokens": 6}
    recipe = small_recipe(tmp_path, tiny_model_dir, evaluation=evaluation)
    merged_recipe = small_recipe(tmp_path, tiny_model_dir, evaluation={**evaluation, "merged": True})
    method = get_method(recipe.method)  # flexi (2, 8)
    trainable = method.build(load_model(str(tiny_model_dir)), seed=0, total_steps=1)
    randomize_lora(trainable.model, seed=5)  # B = 0 would make every rank the base model
    method.export(trainable.model, tmp_path / "artifact")

    rows = get_task("math").load(recipe.task.eval[0])  # 12 rows: two eval batches of 6, both mixed
    ranks = [8, 2, 2, 8, 2, 2, 2, 8, 8, 2, 8, 2]
    rows = [{**r, "rank": k} for r, k in zip(rows, ranks)]
    unmerged = generate_with_method(rows, recipe, method, tmp_path / "artifact")
    merged = generate_with_method(rows, merged_recipe, method, tmp_path / "artifact")
    assert [merged[r["id"]]["rank"] for r in rows] == ranks
    assert {unmerged[r["id"]]["stream_position"] for r in rows if r["rank"] == 8} == {0, 1}, "mixed batches"
    # sorted: batch 0 holds six rank-2 rows, batch 1 the seventh and the five rank-8 rows (the seam)
    assert {merged[r["id"]]["stream_position"] for r in rows if r["rank"] == 8} == {1}
    predictions = {k: v["prediction"] for k, v in merged.items()}
    assert predictions == {k: v["prediction"] for k, v in unmerged.items()}

    # the ranks matter for these prompts, so equal predictions mean each group ran at its own rank
    kwargs = {"max_new_tokens": 6, "max_prompt_tokens": recipe.task.max_prompt_tokens,
              "date_string": recipe.task.date_string}
    generator = MethodGenerator(str(tiny_model_dir), "math", method=dataclasses.asdict(method.config),
                                artifact_dir=str(tmp_path / "artifact"), merged=True, **kwargs)
    first = rows[:6]
    batch = {"id": np.asarray([r["id"] for r in first]), "question": np.asarray([r["question"] for r in first]),
             "context": np.asarray([""] * 6), "rank": np.asarray(ranks[:6])}
    expect = [unmerged[r["id"]]["prediction"] for r in first]
    assert generator(batch)["prediction"].tolist() == expect, "the merged path, in this process"
    flipped = generator({**batch, "rank": 10 - batch["rank"]})["prediction"].tolist()
    assert flipped != expect
