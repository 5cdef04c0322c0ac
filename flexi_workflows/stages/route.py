"""Stage 2, route: train the difficulty router on the scored training set.

    score/<fp>/scored.parquet ──► router text per row (the task's user text, no chat template)
        ──► masked mean-pooled base-model input embeddings ──► RankRouter (noise-added CE, balanced)
        ──► <output_dir>/route/<fingerprint>/ router/ (safetensors + JSON), report.json

The router sees exactly what the training and evaluation stages will route on: the task's user text
(question, plus context for QA), tokenized by the base model's tokenizer — or, for speech, the
utterance through the base model's conv stem, masked and mean-pooled (router/audio_pooling.py). It predicts difficulty
classes, not ranks: which rank a class gets belongs to the method, so Flexi (1,8) and (2,8) share
one trained router.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from flexi_workflows.recipes.schema import Recipe
from flexi_workflows.stages.base import Stage, StageContext, StageOutput, StageResult, recipe_storage, run_stage
from flexi_workflows.stages.inputs import task_inputs
from flexi_workflows.stages.score import SCORED, ScoreStage
from flexi_workflows.tasks import get_task

log = logging.getLogger(__name__)

ROUTER_DIR = "router"
REPORT = "report.json"


class RouteStage(Stage):
    kind = "route"
    files = [ROUTER_DIR, REPORT]

    def __init__(self, recipe: Recipe, score: ScoreStage) -> None:
        super().__init__(recipe_storage(recipe), [score])
        self.recipe = recipe
        self.score = score

    def inputs(self) -> dict:
        return {"task": task_inputs(self.recipe), "router": dataclasses.asdict(self.recipe.router),
                "seed": self.recipe.seed}

    def run(self, tmp: Path, upstream: dict[str, StageResult], context: StageContext) -> StageOutput:
        from flexi_workflows.router.apply import router_inputs
        from flexi_workflows.router.audio_pooling import POOLING as AUDIO_POOLING
        from flexi_workflows.router.model import POOLING, RouterSpec, save_router
        from flexi_workflows.router.train import RouterTraining, train_router

        recipe, cfg = self.recipe, self.recipe.router
        scored = upstream[self.score.name].folder / SCORED
        speech = get_task(recipe.task).modality == "speech"
        columns = ["id", "audio", "class"] if speech else ["id", "question", "context", "class"]
        table = pq.read_table(scored, columns=columns).to_pydict()
        labels = np.asarray(table.pop("class"), dtype=np.int64)
        rows = [dict(zip(table, values)) for values in zip(*table.values())]
        model_ref = recipe.model.name_or_path
        features, vocab_size = router_inputs(recipe.task, rows, model_ref, max_length=recipe.task.max_prompt_tokens,
                                             trust_remote_code=recipe.model.trust_remote_code)
        spec = RouterSpec(
            embed_dim=int(features.shape[1]),
            vocab_size=vocab_size,
            class_names=list(recipe.scoring.class_names),
            classifier=cfg.classifier,
            hidden_size=cfg.hidden_size,
            noise_std=cfg.noise_std,
            noise_type=cfg.noise_type,
            noise_on=cfg.noise_on,
            base_model=model_ref,
            pooling=AUDIO_POOLING if speech else POOLING,
        )
        training = RouterTraining(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  batch_size=cfg.batch_size, holdout=cfg.holdout, balance=cfg.balance)
        router, report = train_router(features, labels, spec, training, recipe.seed)
        save_router(router, tmp / ROUTER_DIR)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        hold = report["holdout"]
        log.info("route: held-out accuracy %.3f, recall %s", hold["accuracy"], hold["per_class_recall"])
        metrics = {"holdout_accuracy": hold["accuracy"],
                   **{f"holdout_recall_{k}": v for k, v in hold["per_class_recall"].items() if v is not None}}
        params = {f"router.{k}": v for k, v in dataclasses.asdict(cfg).items()}
        return StageOutput(metrics=metrics, params=params, artifacts=[ROUTER_DIR, REPORT])


def run_route(recipe: Recipe, *, force: bool = False) -> StageResult:
    """Train (or reuse) the router; the score stage for the same inputs must be finished."""
    stage = RouteStage(recipe, ScoreStage(recipe))
    return run_stage(stage, force=force)
