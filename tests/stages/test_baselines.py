"""The baselines as the paper defines them, on a real local Ray cluster with a tiny LLaMA:

* DyLoRA draws one rank per optimizer step, shared by every worker and micro-batch of that step;
* full fine-tuning trains at its own learning rate (the method's `lr` reaches the optimizer).
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from flexi_workflows.adapters.policies import step_rank
from flexi_workflows.stages.train import RANKS_USED, REPORT, run_train
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
    for s, k in expected.items():
        rows[str(k)] += 16  # 2 workers × 2 micro-batches × 4 rows
    assert summary["rows_by_rank"] == dict(sorted(rows.items(), key=lambda kv: int(kv[0])))
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert {k: v for k, v in metrics.items() if k.startswith("train_rank_rows_")} == \
        {f"train_rank_rows_{k}": v for k, v in rows.items()}


def test_full_fine_tuning_trains_at_its_own_learning_rate(tmp_path, tiny_model_dir, ray_local):
    recipe = small_recipe(tmp_path, tiny_model_dir, method={"name": "full", "lr": 2e-5},
                          training={"lr": 0.01, "max_steps": 2, "schedule": "constant", "warmup_ratio": 0.0})
    out = run_train(recipe, recipe.method).folder
    report = json.loads((out / REPORT).read_text())
    assert report["lr"] == 2e-5
    assert report["final_lr"] == pytest.approx(2e-5, rel=1e-9), "the method's lr is what the optimizer stepped with"
    assert not (out / RANKS_USED).exists(), "full fine-tuning has no ranks to record"
