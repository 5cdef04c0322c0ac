"""Users' own data: chat conversations or prompt/completion pairs from JSONL, JSON or parquet files
(or a hub dataset), graded by a metric the recipe chooses.

    task:
      name: custom
      train: {path: data/train.jsonl, columns: {messages: conversation}}
      eval:
        - {path: data/test.parquet, columns: {prompt: question, completion: answer, id: qid}}
      system_prompt: "You are a careful calculator."     # optional
      chat_template: "{% for m in messages %}..."        # optional, a Jinja chat template
      metric: numeric                                      # exact_match | numeric | f1 | module.path:function

Files: `.jsonl` (one object a line, `.jsonl.gz` too), `.json` (one list of objects, or JSON lines),
`.parquet`, or a folder of such files (read in name order); a `name` instead of a `path` loads a hub
dataset with `datasets.load_dataset(name, split=split)`.

Two row shapes, told apart by the source's `columns` (else by whether the first row has `messages`):
- chat: `messages` is a list of {role, content}; the last message is the assistant's answer (the
  training target and the reference), the one before it the user's question, and anything earlier
  (a system message, earlier turns) is part of the prompt;
- prompt/completion: `prompt` is the prompt, `completion` the target and the reference.
`columns` maps these fields (and optionally `id`, else rows are numbered) to the file's own column
names. Every missing column, wrong type and malformed line is an error that names the file, the
line or row, and the recipe key.

Rows keep the shared row layout (tasks/base.py), because that is what stages record and hand on
(scored.parquet, Ray Data batches): `question` is the prompt or the last user message, `target` and
`answers` the completion, and `context` is "" for a prompt/completion row and, for a chat row, its
earlier messages as JSON ("[]" when there are none) — so a prompt is rebuilt from those two fields
wherever a stage builds one.

Prompts: through a chat template when the tokenizer has one or the recipe gives `chat_template`
(which then wins), with the recipe's `system_prompt` first unless the conversation has a system
message of its own. Without a template, the plain format:

    prompt/completion   {system_prompt}\\n\\n{prompt}        (the prompt as written; no system prompt: just it)
    chat                {system}\\n\\nUser: {turn}\\nAssistant: {turn}\\n ... User: {question}\\nAssistant:

and the training target follows after one space, then the end-of-sequence token (data/causal_lm.py).
The router reads the turns' text alone (no system prompt, no role labels), so a question reads the
same from a chat file and from a prompt/completion file.

Metrics (the score stage grades difficulty with it, evaluation reports it):
- exact_match  the prediction equals the reference after SQuAD normalisation (case, punctuation,
               articles and extra spaces ignored), as the QA task's exact match; reported as exact_match
- numeric      the last number of the prediction equals the last number of the reference (relative
               tolerance 1e-4); reported as accuracy, as the math tasks report theirs
- f1           token F1 as the QA task's; exact match reported beside it
- a function   `module.path:function`, imported from the working directory or the installed packages
               and called as function(prediction, reference) → float in [0, 1]; reported under the
               function's name. It runs where results are graded (the driver), never in generation
               actors. Cached stages are keyed on the import path, not the function's code: after
               editing it, rerun with `--force`.
"""

from __future__ import annotations

import importlib
import json
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from flexi_workflows.errors import ConfigError, DataError
from flexi_workflows.metrics import last_number, last_number_match, qa_exact_match, qa_f1
from flexi_workflows.recipes.schema import DataSource, TaskConfig
from flexi_workflows.tasks.base import DEFAULT_DATE_STRING, Row, Task, render_chat, template_clock
from flexi_workflows.tasks.io import dataset_files, iter_jsonl, read_json_list

CHAT, PAIRS = "chat", "prompt/completion"
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
REPORTED_AS = {"exact_match": "exact_match", "numeric": "accuracy", "f1": "f1"}
# names the evaluation tables already use for other columns: a metric function may not take them
RESERVED_NAMES = {"id", "prediction", "answers", "group", "rank", "count", "eval_stream", "stream_position"}


def iter_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for each record of a file or a folder of files; `where` is file:line (JSONL),
    file item i (JSON list) or file row i (parquet)."""
    for file in dataset_files(path, FILE_SUFFIXES):
        name = file.name
        if name.endswith((".jsonl", ".jsonl.gz")) or (name.endswith(".json") and not _starts_with_list(file)):
            yield from ((f"{file}:{n}", obj) for n, obj in iter_jsonl(file))
        elif name.endswith(".json"):
            yield from ((f"{file} item {i}", obj) for i, obj in read_json_list(file))
        elif name.endswith(".parquet"):
            yield from _parquet_records(file)
        else:
            raise DataError(f"{file}: not a dataset file (expected {' / '.join(FILE_SUFFIXES)})")


def _starts_with_list(file: Path) -> bool:
    """Whether a .json file holds one JSON list (else it is read as JSON lines, as `datasets` does)."""
    with open(file, encoding="utf-8") as handle:
        while True:
            chunk = handle.read(4096)
            if not chunk:
                return True  # empty: read_json_list names the problem
            stripped = chunk.lstrip()
            if stripped:
                return stripped.startswith("[")


def _parquet_records(file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as exc:  # not parquet, truncated: the file is the user's to fix
        raise DataError(f"{file}: not a readable parquet file ({exc})") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            yield f"{file} row {index}", obj
            index += 1


def _text(obj: dict, column: str, where: str, ref: str) -> str:
    """A column's value as text (numbers written as the file has them)."""
    if column not in obj:
        raise DataError(f"{where}: no column {column!r} ({ref}); the row has: {', '.join(sorted(obj)) or 'nothing'}")
    value = obj[column]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: column {column!r} ({ref}) should be text, got {type(value).__name__}")
    return value if isinstance(value, str) else str(value)


def _messages(obj: dict, column: str, where: str, ref: str) -> list[dict[str, str]]:
    if column not in obj:
        raise DataError(f"{where}: no column {column!r} ({ref}); the row has: {', '.join(sorted(obj)) or 'nothing'}")
    value = obj[column]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: column {column!r} ({ref}) should be a non-empty list of {{role, content}} "
                        f"messages, got {type(value).__name__ if not isinstance(value, list) else 'an empty list'}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {column}[{i}] should be {{role: text, content: text}}, got {str(message)[:80]}")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message of {column!r} is the answer to learn and must be the assistant's, "
                        f"got role {messages[-1]['role']!r}")
    if len(messages) < 2 or messages[-2]["role"] != "user":
        raise DataError(f"{where}: the message before the last assistant message of {column!r} must be the user's")
    return messages


def resolve_metric(path: str) -> Callable[[str, str], float]:
    """The function `module.path:function` names. The working directory is searched last (relative
    paths in a recipe are read from there too), so a scoring.py beside the recipe works under `flexi`."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if cwd in sys.path or exc.name is None or not module_name.startswith(exc.name):
            raise ConfigError(f"task.metric {path!r}: cannot import {module_name!r} ({exc})") from None
        sys.path.append(cwd)
        try:
            module = importlib.import_module(module_name)
        except ImportError as again:
            raise ConfigError(f"task.metric {path!r}: cannot import {module_name!r} ({again})") from None
    except Exception as exc:  # the module itself fails on import
        raise ConfigError(f"task.metric {path!r}: importing {module_name!r} failed ({type(exc).__name__}: {exc})") from exc
    function = getattr(module, attr, None)
    if function is None:
        raise ConfigError(f"task.metric {path!r}: module {module_name!r} has no {attr!r}")
    if not callable(function):
        raise ConfigError(f"task.metric {path!r}: {attr!r} is a {type(function).__name__}, not a function")
    return function


class CustomTask(Task):
    name = "custom"
    metric = "exact_match"
    plain_template = "{question}"

    def __init__(self, config: TaskConfig | None = None) -> None:
        self.config = config if config is not None else TaskConfig(name=self.name)
        self.metric_spec = self.config.metric or "exact_match"
        self.metric = REPORTED_AS.get(self.metric_spec) or self.metric_spec.rpartition(":")[2]
        if self.metric in RESERVED_NAMES:
            raise ConfigError(f"task.metric {self.metric_spec!r}: a metric function may not be called {self.metric!r} "
                              f"(evaluation tables use that name for another column); rename it")
        self._function: Callable[[str, str], float] | None = None

    @classmethod
    def from_config(cls, config: TaskConfig) -> Task:
        return cls(config)

    # ---- loading -------------------------------------------------------------------------------

    def _key(self, source: DataSource) -> str:
        """The recipe key of `source` (task.train, task.eval.1) with a dot, for error messages; "" for a
        source that is not in the recipe's task section."""
        for key, candidate in self.config.keyed_sources():
            if candidate == source:
                return key + "."
        return ""

    def _load(self, source: DataSource) -> list[Row]:
        self.metric_function()  # a bad import path fails with the data checks, before anything runs
        key = self._key(source)
        if source.path:
            records: Iterable[tuple[str, dict]] = iter_records(source.path)
        else:
            from flexi_workflows.tasks.hub import load_hub_dataset

            data = load_hub_dataset(source.name, None, source.split)
            records = ((f"{source.name}[{source.split}] row {i}", dict(obj)) for i, obj in enumerate(data))
        columns = dict(source.columns or {})
        shape = CHAT if "messages" in columns else PAIRS if ({"prompt", "completion"} & set(columns)) else None
        rows: list[Row] = []
        seen: dict[str, str] = {}
        for where, obj in records:
            if shape is None:  # no mapping: the first row says which shape the data has
                shape = CHAT if "messages" in obj else PAIRS
            row = self._row(obj, where, shape, columns, key, source.label, len(rows))
            if row["id"] in seen:  # numbered rows never repeat: this is a mapped id column
                raise DataError(f"{where}: id {obj[columns['id']]!r} repeats the one at {seen[row['id']]} "
                                f"(column {columns['id']!r}, {key}columns.id, must be unique)")
            seen[row["id"]] = where
            rows.append(row)
            if source.stops_at_limit and len(rows) >= source.limit:
                break
        return rows

    def _row(self, obj: dict, where: str, shape: str, columns: dict[str, str], key: str, label: str, index: int) -> Row:
        def ref(field: str) -> str:
            if field in columns:
                return f"{key}columns.{field}"
            return f"a {shape} row needs it; {key}columns.{field} maps another column"

        if shape == CHAT:
            column = columns.get("messages", "messages")
            messages = _messages(obj, column, where, ref("messages"))
            question, target = messages[-2]["content"], messages[-1]["content"]
            context = json.dumps(messages[:-2], ensure_ascii=False)
        else:
            question = _text(obj, columns.get("prompt", "prompt"), where, ref("prompt"))
            target = _text(obj, columns.get("completion", "completion"), where, ref("completion"))
            context = ""
        if not target.strip():
            raise DataError(f"{where}: the {'assistant answer' if shape == CHAT else 'completion'} is empty: nothing to learn")
        if self.metric_spec == "numeric" and last_number(target) is None:
            raise DataError(f"{where}: task.metric is numeric but the reference {target[:60]!r} has no number")
        rid = _text(obj, columns["id"], where, f"{key}columns.id") if "id" in columns else str(index)
        return {"id": f"{label}:{rid}", "question": question, "context": context, "target": target.strip(),
                "answers": [target.strip()], "source": label}

    # ---- prompts -------------------------------------------------------------------------------

    def messages(self, row: Row) -> list[dict[str, str]]:
        """The conversation a prompt renders: the recipe's system prompt (unless the row has its own),
        the row's earlier messages, its question as the last user message."""
        context = str(row.get("context") or "")
        history = json.loads(context) if context else []
        if self.config.system_prompt and not any(m["role"] == "system" for m in history):
            history = [{"role": "system", "content": self.config.system_prompt}, *history]
        return [*history, {"role": "user", "content": str(row["question"])}]

    def build_prompt(self, row: Row, tokenizer: Any = None, *, date_string: str = DEFAULT_DATE_STRING) -> str:
        own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if tokenizer is not None and (self.config.chat_template or own):
            text = render_chat(tokenizer, self.messages(row), date_string, self.config.chat_template)
            bos = getattr(tokenizer, "bos_token", None)
            if not own and bos and text.startswith(bos):
                # a tokenizer without a template of its own adds BOS when the prompt is tokenized
                # (generation.py, stages/train.py): the template's copy would be a second one
                text = text[len(bos):]
            return text
        if self.config.chat_template:  # no tokenizer at hand (`flexi check`): the template alone, no special tokens
            from transformers.utils.chat_template_utils import render_jinja_template

            with template_clock(date_string):
                rendered, _ = render_jinja_template([self.messages(row)], chat_template=self.config.chat_template,
                                                    add_generation_prompt=True, date_string=date_string)
            return rendered[0]
        return self.plain_prompt(row)

    def plain_prompt(self, row: Row) -> str:
        messages = self.messages(row)
        head = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        prefix = "".join(f"{text}\n\n" for text in head)
        if not row.get("context"):  # prompt/completion: the prompt as written
            return prefix + turns[-1]["content"]
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in turns]
        return prefix + "\n".join(lines) + "\nAssistant:"

    def user_text(self, row: Row) -> str:
        """What the router reads: the conversation's text without system prompt or role labels, so that
        the same question reads the same from a chat file and from a prompt/completion file (a router
        trained on one routes the other)."""
        return "\n".join(m["content"] for m in self.messages(row) if m["role"] != "system")

    # ---- metrics -------------------------------------------------------------------------------

    def metric_function(self) -> Callable[[str, str], float] | None:
        """The user's metric function (imported on first use), None for a built-in metric."""
        if self.metric_spec in REPORTED_AS:
            return None
        if self._function is None:
            self._function = resolve_metric(self.metric_spec)
        return self._function

    def score(self, prediction: str, row: Row) -> float:
        reference = row["answers"][0]
        if self.metric_spec == "exact_match":
            return qa_exact_match(prediction, [reference])
        if self.metric_spec == "numeric":
            return last_number_match(prediction, reference)
        if self.metric_spec == "f1":
            return qa_f1(prediction, [reference])
        function = self.metric_function()
        try:
            value = function(prediction, reference)
        except Exception as exc:
            raise DataError(f"task.metric {self.metric_spec!r} failed on row {row['id']}: "
                            f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:  # NaN fails the range too
            raise DataError(f"task.metric {self.metric_spec!r} returned {value!r} for row {row['id']}: "
                            f"expected a number in [0, 1]")
        return float(value)

    def metrics(self, prediction: str, row: Row) -> dict[str, float]:
        out = {self.metric: self.score(prediction, row)}
        if self.metric_spec == "f1":
            out["exact_match"] = qa_exact_match(prediction, row["answers"])
        return out
