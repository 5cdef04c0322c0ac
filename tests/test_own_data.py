"""Users' own data (task custom) through the real pipeline, and the README's `flexi check` command verbatim."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flexi_workflows.pipeline import run_pipeline
from flexi_workflows.recipes import Recipe
from flexi_workflows.recipes.loader import build
from tests.conftest import REPO_ROOT
from tests.helpers import small_recipe_data
from tests.tasks import own_metric

pytestmark = pytest.mark.slow

TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


def write_fixtures(folder: Path) -> tuple[Path, Path]:
    """A chat training set (the conversation in a column named `conversation`) and a prompt/completion eval
    set with columns of other names. Half the answers are short: `own_metric:short_answer` grades those 1,
    whatever the random tiny model says, so both difficulty classes have rows."""
    def answer(a: int, b: int) -> str:
        return str(a + b) if (a + b) % 2 else f"{a}+{b}={a + b}. #### {a + b}"

    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps({"conversation": [{"role": "user", "content": f"What is {i % 7} plus {i // 7}?"},
                                                          {"role": "assistant", "content": answer(i % 7, i // 7)}]}) + "\n"
                             for i in range(24)))
    pairs = folder / "pairs.json"
    pairs.write_text(json.dumps([{"qid": f"q{i}", "q": f"What is {i} plus 5?", "a": answer(i, 5)} for i in range(4)]))
    return train, pairs


def test_a_chat_file_and_a_mapped_prompt_completion_file_run_through_score_route_train_evaluate(
        tmp_path, tiny_model_dir, ray_local):
    (tmp_path / "data").mkdir()
    train, pairs = write_fixtures(tmp_path / "data")
    data = small_recipe_data(tmp_path, tiny_model_dir, training={"max_steps": 2}, evaluation={"include_base": False})
    data["task"] = {
        "name": "custom", "max_prompt_tokens": 64, "max_target_tokens": 24,
        "train": {"path": str(train), "columns": {"messages": "conversation"}},
        "eval": [{"path": str(pairs), "columns": {"prompt": "q", "completion": "a", "id": "qid"}}],
        "system_prompt": "Add.", "chat_template": TEMPLATE, "metric": "tests.tasks.own_metric:short_answer",
    }
    recipe = build(Recipe, data)
    own_metric.CALLS.clear()
    summary = run_pipeline(recipe)

    assert summary["metric"] == "short_answer"  # reported under the function's name
    [row] = summary["rows"]
    assert (row["method"], row["dataset"]) == ("flexi-2-8", "pairs")
    assert row["short_answer_all"] == 0.5  # two of the four references are short
    # the user's function graded the training set (difficulty) and the eval set (evaluation)
    references = [ref for _, ref in own_metric.CALLS]
    assert references[:2] == ["0+0=0. #### 0", "1"] and references[24:] == ["5", "1+5=6. #### 6", "7", "3+5=8. #### 8"]

    out = Path(recipe.output_dir)
    scored = pq.read_table(next(out.rglob("scored.parquet"))).to_pydict()
    assert sorted(set(scored["class"])) == [0, 1]  # short answers easy, long ones hard
    # prompts built in the Ray Data actors: the recipe's template and system prompt over the mapped column
    assert scored["prompt"][0] == "[system] Add.\n[user] What is 0 plus 0?\n[assistant]"
    predictions = pq.read_table(next(out.rglob("predictions/pairs.parquet"))).to_pydict()
    assert sorted(predictions["id"]) == ["pairs:q0", "pairs:q1", "pairs:q2", "pairs:q3"]
    assert predictions["short_answer"] == [1.0, 0.0, 1.0, 0.0]


def test_the_readme_check_command_reads_the_example_data():
    done = subprocess.run([".venv/bin/flexi", "check", "jobs/own-data.yaml"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "task.train: 64 rows, chat from flexi_workflows/assets/own-data/arith-chat.jsonl" in done.stdout
    assert "task.eval.0: 32 rows, prompt/completion from flexi_workflows/assets/own-data/arith-qa.json" in done.stdout
    assert "\nQuestion: Ivy has 19 shells. He gives away 1. How many shells?\nAnswer: 19-1=18. #### 18" in done.stdout


def test_check_stops_on_a_missing_mapped_column_with_the_file_line_and_key(tmp_path, capsys):
    from flexi_workflows.cli import main

    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n" + json.dumps({"question": "3+3?"}) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"task:\n  name: custom\n  train: {{path: {data}, columns: {{prompt: question, completion: answer}}}}\n"
                      f"  eval: [{{path: {data}}}]\nmodel: {{name_or_path: builtin:arith-tiny}}\n")
    assert main(["check", str(recipe)]) == 2
    assert (f"flexi check: error: {data}:2: no column 'answer' (task.train.columns.completion); the row has: question"
            in capsys.readouterr().err)
