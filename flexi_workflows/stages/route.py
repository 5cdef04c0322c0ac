"""Stage 2, route: train the difficulty router on the scored training set.

    score/scored.parquet ──► router text per row (the task's user text, no chat template)
        ──► masked mean-pooled base-model input embeddings ──► RankRouter (noise-added CE, balanced)
        ──► <output_dir>/route/router/ (safetensors + JSON), report.json

The router sees exactly what the training and evaluation stages will route on: the task's user text
(question, plus context for QA), tokenized by the base model's tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from flexi_workflows.errors import ConfigError
from flexi_workflows.recipes.schema import Recipe
from flexi_workflows.stages.common import cached_output, manifest_fingerprint, publish_stage
from flexi_workflows.stages.score import SCORED
from flexi_workflows.stages.score import stage_dir as score_dir
from flexi_workflows.tasks import get_task

log = logging.getLogger(__name__)

ROUTER_DIR = "router"
REPORT = "report.json"


def stage_dir(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / "route"


def router_texts(task_name: str, questions, contexts) -> list[str]:
    task = get_task(task_name)
    return [task.user_text({"question": str(q), "context": str(c)}) for q, c in zip(questions, contexts)]


def flexi_ranks(recipe: Recipe) -> list[int]:
    """The class → rank map stored with the router: the first flexi method's ranks (every flexi method
    of a recipe shares the router's classes and maps them to its own ranks when it routes)."""
    for key, method in recipe.keyed_methods():
        if method.name == "flexi":
            if len(method.ranks) != recipe.scoring.num_classes:
                raise ConfigError(f"{key}.ranks {method.ranks} does not give one rank per difficulty class")
            return list(method.ranks)
    raise ConfigError(
        f"the router maps {recipe.scoring.num_classes} difficulty classes to ranks, but the recipe has no flexi "
        f"method (method.name / compare) to give one rank per class"
    )


def route_fingerprint(recipe: Recipe) -> dict:
    return {
        "stage": "route",
        "score": manifest_fingerprint(score_dir(recipe)),
        "router": dataclasses.asdict(recipe.router),
        "class_ranks": flexi_ranks(recipe),
        "seed": recipe.seed,
    }


def run_route(recipe: Recipe, *, force: bool = False) -> Path:
    from flexi_workflows.models.loading import load_tokenizer
    from flexi_workflows.router.model import RouterSpec, save_router
    from flexi_workflows.router.pooling import load_input_embeddings, pool_texts
    from flexi_workflows.router.train import train_router

    class_ranks = flexi_ranks(recipe)
    scored_path = score_dir(recipe) / SCORED
    if not scored_path.is_file():
        raise ConfigError(f"{scored_path}: no scored data; run `flexi score` with this recipe first")
    out_dir = stage_dir(recipe)
    inputs = route_fingerprint(recipe)
    if not force and cached_output(out_dir, inputs) is not None:
        log.info("route: inputs unchanged, reusing %s", out_dir)
        return out_dir

    table = pq.read_table(scored_path, columns=["question", "context", "class"]).to_pydict()
    texts = router_texts(recipe.task.name, table["question"], table["context"])
    labels = np.asarray(table["class"], dtype=np.int64)
    model_ref = recipe.model.name_or_path
    tokenizer = load_tokenizer(model_ref, trust_remote_code=recipe.model.trust_remote_code, padding_side="right")
    embedding = load_input_embeddings(model_ref, trust_remote_code=recipe.model.trust_remote_code)
    features = pool_texts(texts, tokenizer, embedding, max_length=recipe.task.max_prompt_tokens)
    cfg = recipe.router
    spec = RouterSpec(
        embed_dim=int(embedding.weight.shape[1]),
        vocab_size=int(embedding.weight.shape[0]),
        class_names=list(recipe.scoring.class_names),
        class_ranks=class_ranks,
        classifier=cfg.classifier,
        hidden_size=cfg.hidden_size,
        noise_std=cfg.noise_std,
        noise_type=cfg.noise_type,
        noise_on=cfg.noise_on,
        base_model=model_ref,
    )
    router, report = train_router(features, labels, spec, cfg, recipe.seed)
    with publish_stage(out_dir, inputs, [ROUTER_DIR, REPORT]) as tmp:
        save_router(router, tmp / ROUTER_DIR)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    hold = report["holdout"]
    log.info("route: held-out accuracy %.3f, recall %s", hold["accuracy"], hold["per_class_recall"])
    return out_dir
