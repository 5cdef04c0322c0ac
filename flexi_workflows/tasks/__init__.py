"""Task registry: a task loads rows, builds prompts and scores predictions."""

from __future__ import annotations

from flexi_workflows.errors import ConfigError
from flexi_workflows.recipes.schema import TaskConfig
from flexi_workflows.tasks.arith import ArithTask
from flexi_workflows.tasks.base import DataSource, Row, Task, metric_key, subset_counts, subset_of
from flexi_workflows.tasks.custom import CustomTask
from flexi_workflows.tasks.math import MathTask
from flexi_workflows.tasks.qa import QATask
from flexi_workflows.tasks.speech import SpeechTask

TASKS: dict[str, type[Task]] = {t.name: t for t in (MathTask, QATask, ArithTask, SpeechTask, CustomTask)}


def get_task(task: str | TaskConfig) -> Task:
    """The task a recipe's `task` section describes (its settings included: task custom reads some),
    or a task by name with default settings."""
    name = task if isinstance(task, str) else task.name
    try:
        cls = TASKS[name]
    except KeyError:
        raise ConfigError(f"task.name: unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))}") from None
    return cls() if isinstance(task, str) else cls.from_config(task)


__all__ = ["TASKS", "DataSource", "Row", "Task", "get_task", "metric_key", "subset_counts", "subset_of"]
