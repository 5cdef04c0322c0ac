"""The one routing step shared by training and evaluation: class per row → the method's rank.

Training and evaluation must route the same text the same way, or a model is evaluated on ranks it
never trained with; both call `assign_ranks`, and only methods that route get here. Classes come
from one of two sources:

    learned   the trained router (route stage) classifies each input's text
    oracle    the scored classes: the score stage's class for a training row; for an evaluation
              item, the base model's own graded answer (base eval stage) cut by scoring.thresholds —
              a perfect router, the upper bound on what routing can give
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flexi_workflows.errors import ConfigError
from flexi_workflows.methods import Method
from flexi_workflows.recipes.schema import Recipe
from flexi_workflows.stages.base import StageResult
from flexi_workflows.stages.route import ROUTER_DIR
from flexi_workflows.tasks import Row, get_task


def assign_ranks(recipe: Recipe, method: Method, rows: list[Row], source: StageResult,
                 dataset: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(rank per row, routing statistics); `source` is the route stage (learned) or, for the oracle,
    the score stage (training rows) or the base eval stage (evaluation set `dataset`)."""
    if method.routing == "oracle":
        classes = oracle_classes(recipe, rows, source, dataset)
    else:
        from flexi_workflows.router.apply import route_rows

        classes = route_rows(recipe.task, rows, source.folder / ROUTER_DIR, recipe.model.name_or_path,
                             max_length=recipe.task.max_prompt_tokens, trust_remote_code=recipe.model.trust_remote_code)
    ranks = method.ranks_for(classes)
    stats = {"mean_rank": float(np.mean(ranks)), "rank_shares": {str(r): float(np.mean(ranks == r)) for r in method.ranks}}
    return ranks, stats


def oracle_classes(recipe: Recipe, rows: list[Row], source: StageResult, dataset: str | None) -> np.ndarray:
    import pyarrow.parquet as pq

    from flexi_workflows.scoring.difficulty import assign_classes

    if source.kind == "score":
        from flexi_workflows.stages.score import SCORED

        table = pq.read_table(source.folder / SCORED, columns=["id", "class"]).to_pydict()
        by_id = dict(zip(table["id"], table["class"]))
    else:
        from flexi_workflows.stages.evaluate import PREDICTIONS

        task = get_task(recipe.task)
        metric = task.metric
        table = pq.read_table(source.folder / PREDICTIONS / f"{dataset}.parquet", columns=["id", metric]).to_pydict()
        by_id = dict(zip(table["id"], assign_classes(table[metric], recipe.scoring.thresholds,
                                                     higher_is_better=task.higher_is_better).tolist()))
    missing = [r["id"] for r in rows if r["id"] not in by_id]
    if missing:
        raise ConfigError(f"oracle routing: {len(missing)} rows have no scored class in {source.folder} "
                          f"(e.g. {missing[:3]})")
    return np.asarray([by_id[r["id"]] for r in rows], dtype=np.int64)
