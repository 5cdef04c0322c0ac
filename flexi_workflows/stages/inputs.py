"""The pieces of stage fingerprints that several stages share: which model, which data, which settings.

Only what changes a result goes in. `RESULT_NEUTRAL` lists the recipe keys that never do (resources,
logging, where things are written); tests/stages/test_fingerprints.py walks every recipe key and
checks each is either here or changes exactly the stages it affects. GPUs per worker are not here:
with `precision: auto` they decide bf16, which the train fingerprint records as resolved precision.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any

from flexi_workflows.recipes.schema import DataSource, ModelConfig, Recipe

RESULT_NEUTRAL = (
    "name", "output_dir", "storage", "model.cache_dir", "task.train.note", "task.eval.*.note",
    "scoring.num_actors", "scoring.cpus_per_actor", "scoring.gpus_per_actor",
    "training.log_every", "training.checkpoint_every", "training.max_failures", "training.gradient_checkpointing",
    "distribution.cpus_per_worker", "distribution.torch_threads",
    # ZeRO-Offload moves where the optimizer state / parameters live, not the update: the same torch AdamW
    # steps the same fp32 master values (measured on CPU, ZeRO 1-3, fp32 and bf16: identical losses)
    "distribution.offload_optimizer", "distribution.offload_params",
    "evaluation.include_base", "evaluation.num_actors", "evaluation.cpus_per_actor", "evaluation.gpus_per_actor",
    "tracking.*", "ray.*", "sweep", "sweep.*",
)


@lru_cache(maxsize=32)
def _model_digest(ref: str) -> tuple:
    from flexi_workflows.models.loading import model_fingerprint

    return tuple(sorted(model_fingerprint(ref).items()))


def model_inputs(model: ModelConfig) -> dict[str, Any]:
    return {**dict(_model_digest(model.name_or_path)), "dtype": model.dtype, "trust_remote_code": model.trust_remote_code}


def data_inputs(source: DataSource) -> dict[str, Any]:
    from flexi_workflows.fsutil import path_digest

    data: dict[str, Any] = {"source": dataclasses.asdict(source)}
    data["source"].pop("note")  # a remark for reports, not an input
    if source.columns is None:  # unset (every task but custom): fingerprints as before the key existed
        data["source"].pop("columns")
    if source.path:
        data["source"].pop("path")  # by content, not by where the file lies
        if (source.name or "").startswith("builtin:"):  # a built-in corpus: its cache folder is named by its spec
            from pathlib import Path

            data["digest"] = Path(source.path).name
        else:
            data["digest"] = path_digest(source.path)
    return data


def dataset_record(source: DataSource, context: str) -> dict[str, Any]:
    """A data source as MLflow records an input dataset (tracking.Tracker.log_datasets): where it lies and
    the digest of the rows used (content, split, limit and selection — what data_inputs fingerprints)."""
    from flexi_workflows.fsutil import fingerprint

    return {"name": source.label, "uri": source.path, "hub_name": None if source.path else source.name,
            "digest": fingerprint(data_inputs(source)), "context": context}


def task_inputs(recipe: Recipe) -> dict[str, Any]:
    # the chat template's date is part of every prompt (TaskConfig.date_string)
    inputs = {"name": recipe.task.name, "max_prompt_tokens": recipe.task.max_prompt_tokens,
              "date_string": recipe.task.date_string}
    # task custom's prompt and metric settings, only where set (other tasks' fingerprints stay as they were);
    # a metric function counts by its import path, not its code (tasks/custom.py)
    for key in ("system_prompt", "chat_template", "metric"):
        if getattr(recipe.task, key) is not None:
            inputs[key] = getattr(recipe.task, key)
    return inputs
