"""What a task is: how to load its rows, prompt the model, and score a prediction.

Rows are plain dicts so they travel unchanged through Ray Data, parquet and JSON:

    id        unique within the source ("gsm8k_train:17")
    question  the question (the user turn of the prompt)
    context   supporting passage ("" when the task has none)
    target    the training target text (what the model learns to produce)
    answers   gold answers as strings (math: one numeric string; QA: every accepted answer)
    source    the DataSource name the row came from

Speech (a later issue) adds an `audio` field and a feature extractor in place of the prompt; the
loader/scoring split here is what stays the same.
"""

from __future__ import annotations

from typing import Any, ClassVar

from flexi_workflows.errors import DataError
from flexi_workflows.recipes.schema import DataSource

Row = dict[str, Any]


class Task:
    """A task family: math (accuracy) or QA (F1 / EM)."""

    name: ClassVar[str]
    metric: ClassVar[str]  # the difficulty metric: "accuracy" or "f1"
    plain_template: ClassVar[str]

    def load(self, source: DataSource) -> list[Row]:
        rows = self._load(source)
        if source.limit is not None:
            rows = rows[: source.limit]
        if not rows:
            raise DataError(f"{source.path or source.name}: the dataset is empty")
        return rows

    def _load(self, source: DataSource) -> list[Row]:
        raise NotImplementedError

    def user_text(self, row: Row) -> str:
        return self.plain_template.format(**row)

    def build_prompt(self, row: Row, tokenizer: Any = None) -> str:
        """The prompt text: the tokenizer's chat template when it has one, else the plain template."""
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": self.user_text(row)}], add_generation_prompt=True, tokenize=False
            )
        return self.user_text(row) + self.answer_prefix

    answer_prefix: ClassVar[str] = "\nAnswer:"

    def score(self, prediction: str, row: Row) -> float:
        """The difficulty metric in [0, 1]."""
        raise NotImplementedError

    def metrics(self, prediction: str, row: Row) -> dict[str, float]:
        """Every metric the paper reports for this task."""
        return {self.metric: self.score(prediction, row)}
