"""Routing a whole dataset: the data-pipeline step that gives every row its difficulty class before
training or evaluation (the method maps classes to ranks, and the rank travels with the batch, so
the workers never need the router)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def route_texts(texts: Sequence[str], router_dir: str | Path, model_ref: str, *, max_length: int = 512,
                trust_remote_code: bool = False) -> np.ndarray:
    """The router's difficulty class (0 = easiest) for each router text."""
    from flexi_workflows.models.loading import load_config, load_tokenizer
    from flexi_workflows.router.model import load_router
    from flexi_workflows.router.pooling import load_input_embeddings, pool_texts

    router = load_router(router_dir, load_config(model_ref, trust_remote_code=trust_remote_code))
    tokenizer = load_tokenizer(model_ref, trust_remote_code=trust_remote_code, padding_side="right")
    embedding = load_input_embeddings(model_ref, trust_remote_code=trust_remote_code)
    features = pool_texts(list(texts), tokenizer, embedding, max_length=max_length)
    return router.classify(features).numpy().astype(np.int64)
