"""What a task is: how to load its rows, prompt the model, and score a prediction.

Rows are plain dicts so they travel unchanged through Ray Data, parquet and JSON:

    id        unique within the source ("gsm8k_train:17")
    question  the question (the user turn of the prompt)
    context   supporting passage ("" when the task has none)
    target    the training target text (what the model learns to produce)
    answers   gold answers as strings (math: one numeric string; QA: every accepted answer)
    source    the DataSource name the row came from
    subset    the part of a multi-part dataset the row belongs to (MRQA: SQuAD, NewsQA, ...;
              MetaMathQA: GSM_AnsAug, ...); absent for single-part datasets

Rows of users' own files (tasks/custom.py) keep this layout: `question` is the prompt or a chat's last
user message, and `context` a chat's earlier messages as JSON, so prompts can be rebuilt from the two
fields every stage passes on.

Speech rows (tasks/speech.py) add `audio` (a file path or encoded bytes) in place of a question and
`modality = "speech"`: the model hears the audio instead of reading a prompt; the loader/scoring
split here stays the same.
"""

from __future__ import annotations

import datetime
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

from flexi_workflows.errors import DataError
from flexi_workflows.recipes.schema import DataSource, TaskConfig, parse_date_string

Row = dict[str, Any]
DEFAULT_DATE_STRING = TaskConfig.date_string  # "26 Jul 2024", the Llama 3.x templates' own fallback


_CLOCK_LOCK = threading.Lock()


@contextmanager
def template_clock(date_string: str) -> Iterator[None]:
    """While rendering, chat templates' `strftime_now` reads `date_string`'s day (midnight), not today.

    transformers hands templates a `strftime_now` that calls `datetime.now()` in its chat-template
    module and turns callables passed as template variables into strings, so the clock is pinned where
    it is read, for the duration of one render, under a lock."""
    day = parse_date_string(date_string)
    try:
        import transformers.utils.chat_template_utils as chat_utils
    except ImportError:  # no transformers, no templates to pin
        yield
        return
    with _CLOCK_LOCK:
        real = getattr(chat_utils, "datetime", None)
        if not (isinstance(real, type) and issubclass(real, datetime.datetime)):
            yield  # an internal layout this does not know: date_string alone pins the Llama templates
            return

        class PinnedDatetime(real):  # type: ignore[misc, valid-type]
            @classmethod
            def now(cls, tz=None):
                return cls(day.year, day.month, day.day, tzinfo=tz)

        chat_utils.datetime = PinnedDatetime
        try:
            yield
        finally:
            chat_utils.datetime = real


def subset_of(row: Row) -> str:
    """The row's subset, or its source for rows of a single-part dataset."""
    return str(row.get("subset") or row.get("source") or "")


def subset_counts(rows: list[Row]) -> dict[str, int]:
    """Rows per subset, by name (what a stage records so a mix can be checked after the fact)."""
    counts: dict[str, int] = {}
    for row in rows:
        key = subset_of(row)
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def metric_key(name: str) -> str:
    """A subset name as an MLflow metric-name part (letters, digits, _ - . / and spaces only)."""
    return re.sub(r"[^\w\-./ ]", "_", name) or "_"


def subset_quotas(sizes: dict[str, int], total: int) -> dict[str, int]:
    """`total` rows shared equally by subsets of the given sizes; a subset too small for its share
    gives the rest to the others (water-filling), and leftover single rows go to the largest subsets."""
    quotas: dict[str, int] = {}
    remaining = min(total, sum(sizes.values()))
    order = sorted(sizes, key=lambda k: (sizes[k], k))
    for i, key in enumerate(order):
        take = min(sizes[key], remaining // (len(order) - i))
        quotas[key] = take
        remaining -= take
    return {key: quotas[key] for key in sizes}


class Selected(list):
    """Rows a loader has already filtered and selected for its source (Task.load leaves them as they are)."""


def selected_indices(keys: list[str | None], fallback: list[str], source: DataSource) -> list[int]:
    """Which rows `source` keeps, in order: row i belongs to subset keys[i] (None for a dataset of one
    part, then it groups under fallback[i]). The subset filter, then `source.selection` on `source.limit`.

    Loaders that can read one column cheaply (a hub dataset's `subset`) call this before building rows;
    others build every row and call select_rows — both draw the very same rows."""
    where = source.path or source.name
    groups_of = [k or f for k, f in zip(keys, fallback)]
    order = list(range(len(keys)))
    if source.subsets is not None:
        present = sorted(set(groups_of))
        missing = [s for s in source.subsets if s not in present]
        if missing:
            raise DataError(f"{where}: subsets {missing} have no rows here (subsets found: "
                            f"{', '.join(present) or 'none'})")
        wanted = set(source.subsets)
        order = [i for i in order if groups_of[i] in wanted]
    selection = source.selection
    if selection == "auto":  # a mix only where the data names several subsets
        selection = "per_subset" if len({keys[i] for i in order if keys[i]}) > 1 else "first"
    limit = len(order) if source.limit is None else min(source.limit, len(order))
    if selection == "first":
        return order[:limit]
    rng = np.random.default_rng(source.seed)
    if selection == "shuffle":
        return [order[i] for i in rng.permutation(len(order))[:limit]]
    groups: dict[str, list[int]] = {}
    for i in order:
        groups.setdefault(groups_of[i], []).append(i)
    quotas = subset_quotas({k: len(v) for k, v in groups.items()}, limit)
    picked = np.concatenate([np.asarray(groups[k], dtype=np.int64)[rng.permutation(len(groups[k]))[: quotas[k]]]
                             for k in groups])
    return picked[rng.permutation(len(picked))].tolist()


def select_rows(rows: list[Row], source: DataSource) -> list[Row]:
    """Subset filter, then `source.selection` applied to `source.limit` (see DataSource)."""
    if not rows:
        return rows
    keys = [r.get("subset") or None for r in rows]
    fallback = [str(r.get("source") or "") for r in rows]
    return [rows[i] for i in selected_indices(keys, fallback, source)]


def render_chat(tokenizer: Any, messages: list[dict[str, str]], date_string: str, template: str | None = None) -> str:
    """`messages` through a chat template (`template`, else the tokenizer's own), ending with the
    assistant's turn opened, with `date_string` as the template's date (see template_clock)."""
    template = template or tokenizer.chat_template
    kwargs = {"chat_template": template} if template is not tokenizer.chat_template else {}
    if isinstance(template, str) and "strftime_now" not in template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             date_string=date_string, **kwargs)
    with template_clock(date_string):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             date_string=date_string, **kwargs)


class Task:
    """A task family: math (accuracy), QA (F1 / EM), speech (WER / CER / ACC) or users' own files."""

    name: ClassVar[str]
    metric: ClassVar[str]  # the difficulty metric: "accuracy", "f1" or "wer"
    plain_template: ClassVar[str]
    modality: ClassVar[str] = "text"  # "text": prompts through the tokenizer; "speech": audio through features
    higher_is_better: ClassVar[bool] = True  # False for an error rate (scoring thresholds then ascend)
    summary_metrics: ClassVar[tuple[str, ...] | None] = None  # what evaluation reports (None: every metric)

    @classmethod
    def from_config(cls, config: TaskConfig) -> Task:
        """The task as a recipe's `task` section sets it up; the paper's tasks take no settings there."""
        return cls()

    def load(self, source: DataSource) -> list[Row]:
        """The source's rows: every row parsed (a loader stops early only for `selection: first`),
        then the subset filter and `limit` applied as the source's `selection` says."""
        rows = self._load(source)
        if not isinstance(rows, Selected):
            rows = select_rows(rows, source)
        if not rows:
            raise DataError(f"{source.path or source.name}: the dataset is empty")
        return rows

    def _load(self, source: DataSource) -> list[Row]:
        raise NotImplementedError

    def user_text(self, row: Row) -> str:
        return self.plain_template.format(**row)

    def build_prompt(self, row: Row, tokenizer: Any = None, *, date_string: str = DEFAULT_DATE_STRING) -> str:
        """The prompt text: the tokenizer's chat template when it has one, else the plain template.

        The template gets a fixed date (TaskConfig.date_string) both as `date_string` (what Llama 3.x
        templates read) and as its `strftime_now` clock (templates that read the clock directly), so a
        prompt built tomorrow is the prompt built today."""
        template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if template:
            return render_chat(tokenizer, [{"role": "user", "content": self.user_text(row)}], date_string)
        return self.user_text(row) + self.answer_prefix

    answer_prefix: ClassVar[str] = "\nAnswer:"

    def note(self, source: DataSource, count: int | None) -> str | None:
        """The remark reports show beside a dataset of `count` rows (the source's own `note` here)."""
        return source.note or None

    def score(self, prediction: str, row: Row) -> float:
        """The difficulty metric in [0, 1]."""
        raise NotImplementedError

    def metrics(self, prediction: str, row: Row) -> dict[str, float]:
        """Every metric the paper reports for this task, for one row."""
        return {self.metric: self.score(prediction, row)}

    def aggregate(self, per_row: list[dict[str, float]]) -> dict[str, float]:
        """A set's metrics from its rows' `metrics`: the mean of each (speech sums edits instead)."""
        names = self.summary_metrics or (list(per_row[0]) if per_row else [])
        return {m: float(np.mean([r[m] for r in per_row])) for m in names} if per_row else {}
