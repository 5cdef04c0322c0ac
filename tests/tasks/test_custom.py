"""Task custom: users' own files (chat or prompt/completion; JSONL, JSON, parquet), the column mapping,
prompts, metrics, and errors that name the file, the line and the recipe key."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flexi_workflows.errors import ConfigError, DataError
from flexi_workflows.recipes import Recipe
from flexi_workflows.recipes.loader import build
from flexi_workflows.recipes.schema import TaskConfig
from flexi_workflows.tasks import DataSource, get_task
from tests.tasks import own_metric

CHAT = [
    {"conversation": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "#### 4"}], "n": 1},
    {"conversation": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                      {"role": "assistant", "content": "2"}, {"role": "user", "content": "and 2+3?"},
                      {"role": "assistant", "content": "so 5"}], "n": 2},
]
PAIRS = [{"qid": "a", "question": "Capital of France?", "answer": "Paris"},
         {"qid": "b", "question": "3 times 4?", "answer": 12}]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_of(tmp_path: Path, train: dict, evals: list[dict] | None = None, **settings) -> tuple:
    """(task, its TaskConfig) built as a recipe is, so errors carry recipe keys."""
    config = build(TaskConfig, {"name": "custom", "train": train, "eval": evals or [], **settings}, source="recipe")
    return get_task(config), config


def test_chat_rows_through_a_column_mapping(tmp_path):
    path = jsonl(tmp_path / "chat.jsonl", CHAT)
    task, config = task_of(tmp_path, {"path": str(path), "columns": {"messages": "conversation"}})
    rows = task.load(config.train)
    assert [r["id"] for r in rows] == ["chat:0", "chat:1"]
    assert rows[0]["question"] == "What is 2+2?" and rows[0]["target"] == "#### 4" and rows[0]["answers"] == ["#### 4"]
    assert rows[1]["question"] == "and 2+3?" and rows[1]["target"] == "so 5"
    # the plain prompt format: the system message, earlier turns, the question, the assistant's turn opened
    assert task.build_prompt(rows[0]) == "User: What is 2+2?\nAssistant:"
    assert task.build_prompt(rows[1]) == "Be brief.\n\nUser: 1+1?\nAssistant: 2\nUser: and 2+3?\nAssistant:"
    # the router's input: the text of the turns, as a prompt/completion row with the same question reads
    assert task.user_text(rows[1]) == "1+1?\n2\nand 2+3?" and task.user_text(rows[0]) == "What is 2+2?"


def test_prompt_completion_rows_from_a_json_list_with_mapped_columns_and_ids(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(PAIRS))
    source = {"path": str(path), "columns": {"prompt": "question", "completion": "answer", "id": "qid"}}
    task, config = task_of(tmp_path, source, system_prompt="Answer in one word.")
    rows = task.load(config.train)
    assert [(r["id"], r["question"], r["target"]) for r in rows] == [("qa:a", "Capital of France?", "Paris"),
                                                                    ("qa:b", "3 times 4?", "12")]
    assert task.build_prompt(rows[0]) == "Answer in one word.\n\nCapital of France?"  # the prompt as written
    assert get_task("custom").build_prompt(rows[0]) == "Capital of France?"
    assert task.user_text(rows[0]) == "Capital of France?"  # no system prompt for the router


def test_parquet_files_a_folder_and_json_lines_in_a_json_file_without_a_mapping(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]),
                   folder / "a.parquet")
    jsonl(folder / "b.json", [{"prompt": "p3", "completion": "c3"}])  # JSON lines in a .json file, as `datasets` reads
    task, config = task_of(tmp_path, {"path": str(folder)})
    assert [(r["question"], r["target"]) for r in task.load(config.train)] == [("p1", "c1"), ("p2", "c2"), ("p3", "c3")]

    chats = tmp_path / "chat.parquet"  # messages as a list of structs, as parquet holds them
    pq.write_table(pa.Table.from_pylist([{"messages": c["conversation"]} for c in CHAT]), chats)
    rows = task.load(DataSource(path=str(chats)))
    assert [r["target"] for r in rows] == ["#### 4", "so 5"] and json.loads(rows[1]["context"])[0]["role"] == "system"


def test_a_hub_dataset_name_goes_through_the_hub_loader(monkeypatch, tmp_path):
    from flexi_workflows.tasks import hub

    seen = []
    monkeypatch.setattr(hub, "load_hub_dataset", lambda name, config, split: seen.append((name, split)) or iter(PAIRS))
    task, config = task_of(tmp_path, {"name": "me/my-set", "split": "test",
                                      "columns": {"prompt": "question", "completion": "answer"}})
    assert [r["id"] for r in task.load(config.train)] == ["me__my-set:0", "me__my-set:1"]  # the label: one safe file name
    assert seen == [("me/my-set", "test")]


def test_a_missing_mapped_column_names_the_column_the_file_and_the_key(tmp_path):
    good = jsonl(tmp_path / "good.jsonl", [{"q": "x", "a": "y"}])
    bad = jsonl(tmp_path / "bad.jsonl", [{"q": "x", "a": "y"}, {"q": "x2", "answer": "y2"}])
    columns = {"prompt": "q", "completion": "a"}
    task, config = task_of(tmp_path, {"path": str(good), "columns": columns},
                           [{"path": str(good), "columns": columns}, {"path": str(bad), "columns": columns}])
    with pytest.raises(DataError, match=rf"{bad}:2: no column 'a' \(task.eval.1.columns.completion\); the row has: answer, q"):
        task.load(config.eval[1])
    unmapped = jsonl(tmp_path / "plain.jsonl", [{"prompt": "x"}])
    with pytest.raises(DataError, match=r"plain.jsonl:1: no column 'completion' \(a prompt/completion row needs it; "
                                        r"columns.completion maps another column\)"):
        task.load(DataSource(path=str(unmapped)))  # a source not in the recipe: no key to name
    task, config = task_of(tmp_path, {"path": str(unmapped)})
    with pytest.raises(DataError, match=r"task.train.columns.completion maps another column"):
        task.load(config.train)


def test_malformed_files_and_rows_are_errors_that_name_file_and_line(tmp_path):
    task = get_task("custom")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(PAIRS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{broken}:2: malformed JSON"):
        task.load(DataSource(path=str(broken), columns={"prompt": "question", "completion": "answer"}))
    cases = {
        "last.jsonl": ([{"messages": [{"role": "user", "content": "q"}]}], "must be the assistant's, got role 'user'"),
        "order.jsonl": ([{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}],
                        "must be the user's"),
        "shape.jsonl": ([{"messages": [{"role": "user", "content": ["image"]}, {"role": "assistant", "content": "a"}]}],
                        r"messages\[0\] should be \{role: text, content: text\}"),
        "empty.jsonl": ([{"prompt": "q", "completion": "  "}], "the completion is empty"),
        "type.jsonl": ([{"prompt": {"x": 1}, "completion": "a"}], "column 'prompt' .* should be text, got dict"),
    }
    for name, (records, message) in cases.items():
        with pytest.raises(DataError, match=rf"{name}:1: .*{message}"):
            task.load(DataSource(path=str(jsonl(tmp_path / name, records))))
    dupes = jsonl(tmp_path / "dupes.jsonl", [{"prompt": "a", "completion": "b", "k": 1}, {"prompt": "c", "completion": "d", "k": 1}])
    with pytest.raises(DataError, match=r"dupes.jsonl:2: id 1 repeats the one at .*dupes.jsonl:1 \(column 'k'"):
        task.load(DataSource(path=str(dupes), columns={"id": "k"}))
    numeric = get_task(TaskConfig(name="custom", metric="numeric"))
    with pytest.raises(DataError, match="task.metric is numeric but the reference 'Paris' has no number"):
        numeric.load(DataSource(path=str(jsonl(tmp_path / "words.jsonl", [{"prompt": "q", "completion": "Paris"}]))))


def test_recipe_checks_of_the_custom_keys():
    with pytest.raises(ConfigError, match=r"task.metric, task.train.columns: read by task 'custom' only"):
        build(TaskConfig, {"name": "math", "metric": "f1", "train": {"path": "x.jsonl", "columns": {"prompt": "q"}}})
    with pytest.raises(ConfigError, match="unknown field"):
        build(TaskConfig, {"name": "custom", "train": {"path": "x.jsonl", "columns": {"question": "q"}}})
    with pytest.raises(ConfigError, match="either `messages`"):
        build(TaskConfig, {"name": "custom", "train": {"path": "x.jsonl", "columns": {"messages": "m", "prompt": "p"}}})
    with pytest.raises(ConfigError, match="task.metric must be one of exact_match, numeric, f1 or a Python function"):
        build(TaskConfig, {"name": "custom", "metric": "accuracy"})
    # a 0/1 grade leaves a third class empty with one answer per row, as for the math tasks
    three = {"scoring": {"num_classes": 3, "thresholds": [0.8, 0.3], "class_names": ["a", "b", "c"]},
             "method": {"name": "flexi", "ranks": [1, 4, 8]}}
    with pytest.raises(ConfigError, match="leave classes"):
        build(Recipe, {"task": {"name": "custom", "metric": "numeric"}, **three})
    build(Recipe, {"task": {"name": "custom", "metric": "f1"}, **three})


def test_built_in_metrics():
    row = {"id": "r", "question": "q", "context": "", "answers": ["The answer is 12."]}
    exact, numeric, f1 = (get_task(TaskConfig(name="custom", metric=m)) for m in ("exact_match", "numeric", "f1"))
    assert exact.metrics("the Answer is 12", row) == {"exact_match": 1.0}  # SQuAD normalisation, as QA's
    assert exact.metrics("12", row) == {"exact_match": 0.0}
    assert numeric.metrics("3*4 = 12.0", row) == {"accuracy": 1.0} and numeric.score("12 or 13", row) == 0.0
    assert numeric.metric == "accuracy" and exact.metric == "exact_match"
    assert f1.metrics("answer 12", row) == {"f1": pytest.approx(0.8), "exact_match": 0.0}


def test_a_metric_function_by_import_path_is_imported_and_called(tmp_path):
    own_metric.CALLS.clear()
    path = jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "completion": "yes"}, {"prompt": "q", "completion": "a long one"}])
    task, config = task_of(tmp_path, {"path": str(path)}, metric="tests.tasks.own_metric:short_answer")
    rows = task.load(config.train)
    assert task.metric == "short_answer"
    assert [task.metrics("pred", r) for r in rows] == [{"short_answer": 1.0}, {"short_answer": 0.0}]
    assert own_metric.CALLS == [("pred", "yes"), ("pred", "a long one")]
    for spec, message in [("tests.tasks.own_metric:too_big", r"returned 2.0 for row pairs:0: expected a number in \[0, 1\]"),
                          ("tests.tasks.own_metric:broken", "failed on row pairs:0: ZeroDivisionError: no")]:
        with pytest.raises(DataError, match=message):
            get_task(TaskConfig(name="custom", metric=spec)).score("p", rows[0])


@pytest.mark.parametrize("spec,message", [
    ("tests.tasks.no_such_module:score", r"task.metric 'tests.tasks.no_such_module:score': cannot import"),
    ("tests.tasks.own_metric:missing", r"module 'tests.tasks.own_metric' has no 'missing'"),
    ("tests.tasks.own_metric:NOT_A_FUNCTION", "is a int, not a function"),
])
def test_a_bad_metric_import_path_is_a_config_error_naming_the_key_when_data_is_read(tmp_path, spec, message):
    path = jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "completion": "yes"}])
    task, config = task_of(tmp_path, {"path": str(path)}, metric=spec)  # generation actors never import it
    with pytest.raises(ConfigError, match=message):
        task.load(config.train)


def test_a_metric_module_beside_the_recipe_is_found_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_scoring_here.py").write_text("def score(prediction, reference):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    task = get_task(TaskConfig(name="custom", metric="my_scoring_here:score"))
    assert task.score("x", {"id": "r", "answers": ["y"]}) == 0.5


def test_chat_templates_the_tokenizers_own_an_override_and_the_system_prompt(tmp_path, tiny_model_dir):
    from flexi_workflows.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    assert not tokenizer.chat_template
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": c["conversation"]} for c in CHAT])
    override = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    task, config = task_of(tmp_path, {"path": str(path)}, chat_template=override, system_prompt="Think.")
    first, second = task.load(config.train)
    # the tokenizer adds BOS itself when it has no template of its own: the template's copy is dropped
    assert task.build_prompt(first, tokenizer) == "[system] Think.\n[user] What is 2+2?\n[assistant]"
    assert task.build_prompt(second, tokenizer).startswith("[system] Be brief.\n[user] 1+1?\n[assistant] 2\n")  # its own wins
    assert task.build_prompt(first) == task.build_prompt(first, tokenizer)  # `flexi check`: the template alone

    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    plain, _ = task_of(tmp_path, {"path": str(path)})
    assert plain.build_prompt(first, tokenizer) == "<s><user>What is 2+2?<assistant>"  # the model's own template
    assert task.build_prompt(first, tokenizer).startswith("<s>[system] Think.")  # the override wins; BOS kept
