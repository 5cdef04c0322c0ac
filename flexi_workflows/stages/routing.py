"""The one routing step shared by training and evaluation: router → class per row → the method's rank.

Training and evaluation must route the same text the same way, or a model is evaluated on ranks it
never trained with; both call `assign_ranks`, and only methods that need a router get here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flexi_workflows.methods import Method
from flexi_workflows.recipes.schema import Recipe
from flexi_workflows.stages.base import StageResult
from flexi_workflows.stages.route import ROUTER_DIR
from flexi_workflows.tasks import Row, get_task


def assign_ranks(recipe: Recipe, method: Method, rows: list[Row], route: StageResult) -> tuple[np.ndarray, dict[str, Any]]:
    """(rank per row, routing statistics) from the trained router in `route`."""
    from flexi_workflows.router.apply import route_texts

    task = get_task(recipe.task.name)
    classes = route_texts([task.user_text(r) for r in rows], route.folder / ROUTER_DIR, recipe.model.name_or_path,
                          max_length=recipe.task.max_prompt_tokens, trust_remote_code=recipe.model.trust_remote_code)
    ranks = method.ranks_for(classes)
    stats = {"mean_rank": float(np.mean(ranks)), "rank_shares": {str(r): float(np.mean(ranks == r)) for r in method.ranks}}
    return ranks, stats
