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


def write_fixtures(folder: Path) -> tuple[Path, Path, Path]:
    """A chat training set (the answer column named `conversation`), a chat eval set and a prompt/completion
    eval set with columns of other names. Half the answers are short: `own_metric:short_answer` grades
    those 1, whatever the random tiny model says, so both difficulty classes have rows."""
    def chat(a: int, b: int) -> dict:
        answer = str(a + b) if (a + b) % 2 else f"{a}+{b}={a + b}. #### {a + b}"
        return {"conversation": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                 {"role": "assistant", "content": answer}]}
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps(chat(i % 7, i // 7)) + "\n" for i in range(24)))
    chat_eval = folder / "chat_eval.jsonl"
    chat_eval.write_text("".join(json.dumps(chat(i, 3)) + "\n" for i in range(4)))
    pairs = folder / "pairs.json"
    pairs.write_text(json.dumps([{"qid": f"q{i}", "q": f"What is {i} plus 5?", "a": str(i + 5)} for i in range(4)]))
    return train, chat_eval, pairs


def test_chat_and_mapped_prompt_completion_files_run_through_score_route_train_evaluate(tmp_path, tiny_model_dir,
                                                                                         ray_local):
    (tmp_path / "data").mkdir()
    train, chat_eval, pairs = write_fixtures(tmp_path / "data")
    data = small_recipe_data(tmp_path, tiny_model_dir, training={"max_steps": 2}, evaluation={"include_base": False})
    data["task"] = {
        "name": "custom", "max_prompt_tokens": 64, "max_target_tokens": 24,
        "train": {"path": str(train), "columns": {"messages": "conversation"}},
        "eval": [{"path": str(chat_eval), "columns": {"messages": "conversation"}},
                 {"path": str(pairs), "columns": {"prompt": "q", "completion": "a", "id": "qid"}}],
        "system_prompt": "Add.", "chat_template": TEMPLATE, "metric": "tests.tasks.own_metric:short_answer",
    }
    recipe = build(Recipe, data)
    own_metric.CALLS.clear()
    summary = run_pipeline(recipe)

    rows = {(r["method"], r["dataset"]): r for r in summary["rows"]}
    assert set(rows) == {("flexi-2-8", "chat_eval"), ("flexi-2-8", "pairs")}
    assert summary["metric"] == "short_answer"  # the function's name
    assert rows[("flexi-2-8", "pairs")]["short_answer_all"] == 1.0  # every reference there is short
    assert rows[("flexi-2-8", "chat_eval")]["short_answer_all"] == 0.5
    # the user's function graded the training set (difficulty) and both eval sets (evaluation)
    references = [ref for _, ref in own_metric.CALLS]
    assert len(references) == 24 + 4 + 4
    assert references[:2] == ["0+0=0. #### 0", "1"] and references[-4:] == ["5", "6", "7", "8"]

    out = Path(recipe.output_dir)
    scored = pq.read_table(next(out.rglob("scored.parquet"))).to_pydict()
    assert sorted(set(scored["class"])) == [0, 1]  # short answers easy, long ones hard
    # prompts built in the Ray Data actors: the recipe's template and system prompt over the mapped column
    assert scored["prompt"][0] == "[system] Add.\n[user] What is 0 plus 0?\n[assistant]"
    predictions = pq.read_table(next(out.rglob("predictions/pairs.parquet"))).to_pydict()
    assert sorted(predictions["id"]) == ["pairs:q0", "pairs:q1", "pairs:q2", "pairs:q3"]


def test_the_readme_check_command_reads_the_example_data():
    done = subprocess.run([".venv/bin/flexi", "check", "jobs/own-data.yaml"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "task.train: 64 rows, chat from flexi_workflows/assets/own-data/arith-chat.jsonl" in done.stdout
    assert "task.eval.0: 32 rows, prompt/completion from flexi_workflows/assets/own-data/arith-qa.json" in done.stdout
    assert "\nQuestion: Ivy has 19 shells. He gives away 1. How many shells?\nAnswer: 19-1=18. #### 18" in done.stdout
