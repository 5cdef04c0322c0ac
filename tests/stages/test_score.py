"""The score stage on a real local Ray cluster with a tiny LlamaForCausalLM."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from flexi_workflows.errors import ConfigError, DataError
from flexi_workflows.recipes import Recipe
from flexi_workflows.recipes.loader import build
from flexi_workflows.stages.score import build_scored_table, run_score


def _write_math(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"What is {i} plus 1?", "answer": f"{i}+1={i + 1}. #### {i + 1}"}) + "\n")
    return path


def _recipe(tmp_path, model_dir, data, **extra):
    data_cfg = {
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(model_dir)},
        "task": {"name": "math", "train": {"path": str(data)}},
        "scoring": {"max_new_tokens": 6, "batch_size": 4},
    }
    return build(Recipe, data_cfg, overrides=[f"{k}={v}" for k, v in extra.items()])


def test_score_stage_writes_labelled_parquet_and_reuses_it(tmp_path, tiny_model_dir, ray_local):
    data = _write_math(tmp_path / "train.jsonl", 10)
    recipe = _recipe(tmp_path, tiny_model_dir, data)
    out = run_score(recipe).folder
    assert out.parent == tmp_path / "out" / "score"
    table = pq.read_table(out / "scored.parquet").to_pandas()
    assert len(table) == 10 and table["id"].is_unique
    assert {"id", "prompt", "target", "prediction", "score", "class"} <= set(table.columns)
    assert table["prompt"].str.startswith("Question: What is").all()
    assert ((table["score"] >= 0.5) == (table["class"] == 0)).all()
    stats = json.loads((out / "stats.json").read_text())
    assert sum(c["count"] for c in stats["classes"]) == 10

    mtime = (out / "manifest.json").stat().st_mtime_ns
    again = run_score(recipe)
    assert again.folder == out and again.cached
    assert (out / "manifest.json").stat().st_mtime_ns == mtime, "same inputs: reused, not recomputed"
    neutral = run_score(_recipe(tmp_path, tiny_model_dir, data, **{"scoring.num_actors": 2}))
    assert neutral.folder == out and neutral.cached, "the actor count does not change a result"

    changed = run_score(_recipe(tmp_path, tiny_model_dir, data, **{"scoring.max_new_tokens": 4}))
    assert changed.folder != out and not changed.cached, "changed config: computed into its own folder"
    assert (out / "manifest.json").stat().st_mtime_ns == mtime, "the first result stays for whoever needs it"
    _write_math(data, 12)
    grown = run_score(_recipe(tmp_path, tiny_model_dir, data, **{"scoring.max_new_tokens": 4}))
    assert grown.folder not in (out, changed.folder)
    assert len(pq.read_table(grown.folder / "scored.parquet")) == 12, "changed data: recomputed"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")], \
        "no temp folders left"


def test_known_scores_give_known_classes(tmp_path, tiny_model_dir):
    data = _write_math(tmp_path / "train.jsonl", 4)
    recipe = _recipe(tmp_path, tiny_model_dir, data)
    from flexi_workflows.tasks import DataSource, get_task

    rows = get_task("math").load(DataSource(path=str(data)))
    predictions = ["0+1=1. #### 1", "#### 7", "The answer is 3", "no idea"]  # right, wrong, right, wrong
    outputs = {r["id"]: {"prompt": "p", "prediction": p} for r, p in zip(rows, predictions)}
    table, stats = build_scored_table(rows, outputs, recipe)
    assert table.column("score").to_pylist() == [1.0, 0.0, 1.0, 0.0]
    assert table.column("class").to_pylist() == [0, 1, 0, 1]
    assert table.column("class_name").to_pylist() == ["easy", "hard", "easy", "hard"]
    assert [c["share"] for c in stats["classes"]] == [0.5, 0.5]


THREE_CLASSES = {"scoring.num_classes": 3, "scoring.thresholds": "[0.75, 0.25]",
                 "scoring.class_names": "[easy, medium, hard]", "method": "{name: lora}"}


def test_sampled_answers_give_pass_rates_and_three_math_classes(tmp_path, tiny_model_dir):
    data = _write_math(tmp_path / "train.jsonl", 6)
    recipe = _recipe(tmp_path, tiny_model_dir, data, **THREE_CLASSES, **{"scoring.num_samples": 4})
    from flexi_workflows.tasks import DataSource, get_task

    rows = get_task("math").load(DataSource(path=str(data)))
    right = {r["id"]: f"#### {r['answers'][0]}" for r in rows}
    correct_counts = [4, 3, 2, 1, 0, 0]  # per row, of its 4 sampled answers
    outputs = {r["id"]: {"prompt": "p", "prediction": "x",
                         "samples": [right[r["id"]]] * n + ["#### -1"] * (4 - n)} for r, n in zip(rows, correct_counts)}
    table, stats = build_scored_table(rows, outputs, recipe)
    assert table.column("score").to_pylist() == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert table.column("class_name").to_pylist() == ["easy", "easy", "medium", "medium", "hard", "hard"]
    assert table.column("sample_scores").to_pylist()[1] == [1.0, 1.0, 1.0, 0.0]
    assert [c["count"] for c in stats["classes"]] == [2, 2, 2], "every class has rows"
    assert stats["num_samples"] == 4 and stats["pass_rate_histogram"] == {"0/4": 2, "1/4": 1, "2/4": 1, "3/4": 1, "4/4": 1}
    short = {**outputs, rows[0]["id"]: {"prompt": "p", "prediction": "x", "samples": ["#### 1"]}}
    with pytest.raises(RuntimeError, match="num_samples=4"):
        build_scored_table(rows, short, recipe)


def test_sampling_score_stage_on_ray(tmp_path, tiny_model_dir, ray_local):
    """A real sampling run: 3 answers per row from the tiny model, seeded, graded into pass rates."""
    data = _write_math(tmp_path / "train.jsonl", 6)
    recipe = _recipe(tmp_path, tiny_model_dir, data, **{"scoring.num_samples": 3, "scoring.temperature": 1.0,
                                                        "scoring.top_p": 1.0, "scoring.batch_size": 3})
    out = run_score(recipe).folder
    table = pq.read_table(out / "scored.parquet").to_pylist()
    assert all(len(r["samples"]) == 3 and len(r["sample_scores"]) == 3 for r in table)
    assert all(r["score"] == sum(r["sample_scores"]) / 3 for r in table)
    assert json.loads((out / "stats.json").read_text())["num_samples"] == 3
    again = run_score(recipe, force=True).folder
    assert pq.read_table(again / "scored.parquet").column("samples").to_pylist() == [r["samples"] for r in table], \
        "seeded: a rerun draws the same answers"
    greedy = run_score(_recipe(tmp_path, tiny_model_dir, data, **{"scoring.batch_size": 3})).folder
    assert greedy != out and "samples" not in pq.read_table(greedy / "scored.parquet").column_names


def test_bad_data_fails_before_ray_and_leaves_nothing(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "#### 1"}\n{"question": oops}\n')
    recipe = _recipe(tmp_path, tiny_model_dir, bad)
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        run_score(recipe)
    assert not (tmp_path / "out").exists()
    missing = _recipe(tmp_path, tmp_path / "no-model", _write_math(tmp_path / "ok.jsonl", 3))
    with pytest.raises(Exception, match="no such file or folder"):
        run_score(missing)
    with pytest.raises(ConfigError, match="task.train is not set"):
        run_score(build(Recipe, {"model": {"name_or_path": str(tiny_model_dir)}}))
