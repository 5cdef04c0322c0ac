"""The baselines as the paper defines them, on a real local Ray cluster with a tiny LLaMA:

* DyLoRA draws one rank per optimizer step, shared by every worker and micro-batch of that step;
* DyLoRA+ draws one rank per evaluation batch from a stream per actor shard, repeated by the seed;
* full fine-tuning trains at its own learning rate: tests/stages/test_train.py (every method).
"""

from __future__ import annotations

import json
from collections import defaultdict

import pyarrow.parquet as pq
import pytest

from flexi_workflows.adapters.policies import eval_stream, step_rank
from flexi_workflows.methods import get_method
from flexi_workflows.stages.evaluate import METRICS, eval_batches, generate_with_method, run_eval, summarize
from flexi_workflows.stages.train import RANKS_USED, REPORT, run_train
from flexi_workflows.tasks import get_task
from tests.helpers import small_recipe

pytestmark = pytest.mark.slow

SEED = 3


def test_dylora_uses_one_rank_per_optimizer_step_on_every_worker(tmp_path, tiny_model_dir, ray_local):
    # 64 rows / 2 workers / (micro-batch 4 × accumulation 2) = 4 optimizer steps, 8 micro-batches per worker
    recipe = small_recipe(tmp_path, tiny_model_dir, seed=SEED, method={"name": "dylora", "r_min": 1, "r_max": 8},
                          training={"gradient_accumulation_steps": 2},
                          distribution={"num_workers": 2, "cpus_per_worker": 1, "strategy": "deepspeed", "zero_stage": 2})
    result = run_train(recipe, recipe.method)
    out = result.folder
    report = json.loads((out / REPORT).read_text())
    assert report["steps"] == 4
    records = json.loads((out / RANKS_USED).read_text())
    by_step = defaultdict(list)
    for r in records:
        by_step[r["step"]].append(r)
    assert sorted(by_step) == [0, 1, 2, 3]
    expected = {s: step_rank(SEED, s, 1, 8) for s in range(4)}
    assert len(set(expected.values())) > 1, "the seed draws different ranks for different steps"
    for step, entries in by_step.items():
        assert sorted((e["worker"], e["micro_batch"]) for e in entries) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert {e["rank"] for e in entries} == {expected[step]}, f"step {step}: {entries}"
        assert all(e["rows"] == {str(expected[step]): 4} for e in entries)
    summary = report["ranks_used"]
    assert summary["one_rank_per_step"] and summary["workers"] == [0, 1] and summary["micro_batches"] == 16
    rows = defaultdict(int)
    for k in expected.values():
        rows[str(k)] += 16  # 2 workers × 2 micro-batches × 4 rows
    assert summary["rows_by_rank"] == dict(sorted(rows.items(), key=lambda kv: int(kv[0])))
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert {k: v for k, v in metrics.items() if k.startswith("train_rank_rows_")} == \
        {f"train_rank_rows_{k}": v for k, v in rows.items()}
    # evaluated at its fixed eval rank (r_max by default), whatever it drew in training
    mini = run_eval(recipe, recipe.method).read_json(METRICS)["datasets"]["mini"]
    assert mini["count"] == 12 and mini["mean_rank"] == 8 and mini["rank_histogram"] == {"8": 12}


def _dylora_plus_artifact(tmp_path, tiny_model_dir, recipe):
    """A DyLoRA+ adapter as the train stage exports it (untrained: evaluation only reads it)."""
    from flexi_workflows.models.loading import load_model

    method = get_method(recipe.method)
    trainable = method.build(load_model(str(tiny_model_dir)), seed=recipe.seed, total_steps=1)
    method.export(trainable.model, tmp_path / "artifact")
    return method, tmp_path / "artifact"


def test_dylora_plus_eval_ranks_come_from_one_stream_per_actor_and_repeat_per_seed(tmp_path, tiny_model_dir, ray_local):
    recipe = small_recipe(tmp_path, tiny_model_dir, seed=SEED, method={"name": "dylora_plus", "r_min": 1, "r_max": 8},
                          evaluation={"batch_size": 2, "num_actors": 2, "max_new_tokens": 2})
    method, artifact = _dylora_plus_artifact(tmp_path, tiny_model_dir, recipe)
    rows = get_task("math").load(recipe.task.eval[0])  # 12 rows: 6 batches of 2, 3 per actor shard
    batch, stream, position = eval_batches(len(rows), 2, 2)
    assert batch.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert stream.tolist() == [0, 0, 1, 1] * 3 and position.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    streams = {k: eval_stream(SEED, k, 3, 1, 8) for k in (0, 1)}
    assert streams[0].tolist() != streams[1].tolist(), "the two actors' streams differ"
    expected = [int(streams[k][p]) for k, p in zip(stream, position)]

    outputs = generate_with_method(rows, recipe, method, artifact)
    assert [outputs[r["id"]]["rank"] for r in rows] == expected
    again = generate_with_method(rows, recipe, method, artifact)
    assert [again[r["id"]]["rank"] for r in rows] == expected, "the same seed repeats the streams"

    other = small_recipe(tmp_path / "other", tiny_model_dir, seed=SEED + 1, method={"name": "dylora_plus", "r_min": 1, "r_max": 8},
                         evaluation={"batch_size": 2, "num_actors": 2, "max_new_tokens": 2})
    moved = generate_with_method(rows, other, method, artifact)
    assert [moved[r["id"]]["rank"] for r in rows] == [int(eval_stream(SEED + 1, k, 3, 1, 8)[p]) for k, p in zip(stream, position)]
    assert [moved[r["id"]]["rank"] for r in rows] != expected, "another seed, other streams"

    _, table, ranks = summarize("math", rows, outputs)
    assert ranks.tolist() == expected
    assert table.column("eval_stream").to_pylist() == stream.tolist()
    assert table.column("stream_position").to_pylist() == position.tolist()
    pq.write_table(table, tmp_path / "predictions.parquet")  # the columns survive the eval stage's parquet


def test_dylora_plus_evaluation_is_fingerprinted_by_its_number_of_streams(tmp_path, tiny_model_dir):
    from flexi_workflows.stages.plan import plan_pipeline

    def eval_fingerprint(method, actors):
        recipe = small_recipe(tmp_path, tiny_model_dir, method=method, evaluation={"num_actors": actors})
        return plan_pipeline(recipe).methods[0].eval.fingerprint

    plus = {"name": "dylora_plus", "r_min": 1, "r_max": 8}
    assert eval_fingerprint(plus, 1) != eval_fingerprint(plus, 2), "one stream per actor: the count changes the ranks"
    lora = {"name": "lora", "rank": 4}
    assert eval_fingerprint(lora, 1) == eval_fingerprint(lora, 2)
