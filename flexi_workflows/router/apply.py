"""Routing a whole dataset: the data-pipeline step that gives every row its rank before training
or evaluation (so the rank travels with the batch, and the workers never need the router)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from flexi_workflows.router.assign import RankAssigner


def route_texts(texts: Sequence[str], router_dir: str | Path, model_ref: str, class_ranks: Sequence[int], *,
                max_length: int = 512, trust_remote_code: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(classes, ranks) for router texts, with `class_ranks` mapping class k to its rank."""
    import torch

    from flexi_workflows.models.loading import load_config, load_tokenizer
    from flexi_workflows.router.model import load_router
    from flexi_workflows.router.pooling import load_input_embeddings, pool_texts

    router = load_router(router_dir, load_config(model_ref, trust_remote_code=trust_remote_code))
    tokenizer = load_tokenizer(model_ref, trust_remote_code=trust_remote_code, padding_side="right")
    embedding = load_input_embeddings(model_ref, trust_remote_code=trust_remote_code)
    features = pool_texts(list(texts), tokenizer, embedding, max_length=max_length)
    classes = router.classify(features)
    ranks = RankAssigner(class_ranks)(classes)
    return classes.numpy().astype(np.int64), torch.as_tensor(ranks).numpy().astype(np.int64)
