"""Routing a whole dataset: the data-pipeline step that gives every row its difficulty class before
training or evaluation (the method maps classes to ranks, and the rank travels with the batch, so
the workers never need the router).

What the router sees is the same in its training (route stage) and its use (here): for text the
task's user text through the base model's input embeddings (router/pooling.py); for speech the
utterance through the base model's conv stem (router/audio_pooling.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def router_inputs(task_name: Any, rows: Sequence[dict[str, Any]], model_ref: str, *, max_length: int | None = 512,
                  trust_remote_code: bool = False) -> tuple[torch.Tensor, int]:
    """(pooled features (rows, dim), the base model's vocabulary size) for rows with the task's columns
    (`question` / `context`, or `audio` and `id` for speech). `task_name`: what get_task takes, a name or
    the recipe's task section (the router itself does not know the recipe)."""
    from flexi_workflows.models.loading import load_config
    from flexi_workflows.tasks import get_task

    task = get_task(task_name)
    config = load_config(model_ref, trust_remote_code=trust_remote_code)
    if task.modality == "speech":
        from flexi_workflows.models.loading import load_processor
        from flexi_workflows.router.audio_pooling import load_conv_stem, pool_audio

        processor = load_processor(model_ref, trust_remote_code=trust_remote_code)
        stem = load_conv_stem(model_ref, trust_remote_code=trust_remote_code)
        features = pool_audio([r["audio"] for r in rows], processor, stem, ids=[r["id"] for r in rows])
        return features, int(config.vocab_size)
    from flexi_workflows.models.loading import load_tokenizer
    from flexi_workflows.router.pooling import load_input_embeddings, pool_texts

    tokenizer = load_tokenizer(model_ref, trust_remote_code=trust_remote_code, padding_side="right")
    embedding = load_input_embeddings(model_ref, trust_remote_code=trust_remote_code)
    texts = [task.user_text({"question": str(r.get("question", "")), "context": str(r.get("context", ""))}) for r in rows]
    return pool_texts(texts, tokenizer, embedding, max_length=max_length), int(embedding.weight.shape[0])


def route_rows(task_name: Any, rows: Sequence[dict[str, Any]], router_dir: str | Path, model_ref: str, *,
               max_length: int | None = 512, trust_remote_code: bool = False) -> np.ndarray:
    """The router's difficulty class (0 = easiest) for each row."""
    from flexi_workflows.models.loading import load_config
    from flexi_workflows.router.model import load_router

    router = load_router(router_dir, load_config(model_ref, trust_remote_code=trust_remote_code))
    features, _ = router_inputs(task_name, rows, model_ref, max_length=max_length, trust_remote_code=trust_remote_code)
    return router.classify(features).numpy().astype(np.int64)

