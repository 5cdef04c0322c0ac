"""The difficulty router: input embeddings → difficulty class (paper §3 "Router"); the method maps a class to its rank."""

from flexi_workflows.router.assign import RankAssigner
from flexi_workflows.router.model import RankRouter, RouterSpec, load_router, save_router
from flexi_workflows.router.pooling import masked_mean_pool

__all__ = ["RankAssigner", "RankRouter", "RouterSpec", "load_router", "masked_mean_pool", "save_router"]
