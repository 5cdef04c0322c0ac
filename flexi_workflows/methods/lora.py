"""The LoRA family on the nested Flexi-LoRA adapter: LoRA-r, DyLoRA, DyLoRA+ and Flexi-LoRA.

    W x + γ(r)·B[:, :r] A[:r] x      A: r_max × in, B: out × r_max (B starts at 0)

They differ only in who picks r — a constant, a random draw, or the router — so they share one
layer, one save/load path and one parameter accounting (params per rank × rank used). LoRA-r is
numerically PEFT's LoRA (tests/adapters check this).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flexi_workflows.methods.base import Accounting, Method, Trainable

METHOD_FILE = "method.json"


class NestedLoraMethod(Method):
    """Shared by every method on the nested adapter; subclasses say which rank policy drives it."""

    reports_ranks = True
    merges_ranks = True

    def rank_policy(self, seed: int):
        raise NotImplementedError

    @property
    def r_max(self) -> int:
        return max(self.ranks)

    @property
    def label(self) -> str:
        return "-".join([self.name.replace("_", "")] + [str(r) for r in self.ranks])

    def adapter_config(self):
        from flexi_workflows.adapters import FlexiLoraConfig

        c = self.config
        return FlexiLoraConfig(r_max=self.r_max, alpha=c.alpha, scaling=c.scaling, dropout=c.dropout, targets=c.targets)

    def build(self, base, *, seed: int, total_steps: int) -> Trainable:
        from flexi_workflows.adapters import inject_flexi_lora

        model = inject_flexi_lora(base, self.adapter_config(), self.rank_policy(seed))
        return Trainable(model, uses_row_ranks=self.routing is not None, set_step=model.set_step,
                         ranks_used=lambda: model.last_ranks)

    def export(self, model, path: Path, state_dict: dict | None = None) -> None:
        from flexi_workflows.adapters.checkpoint import save_adapter

        path.mkdir(parents=True, exist_ok=True)
        save_adapter(model, path / "adapter")
        (path / METHOD_FILE).write_text(json.dumps({"name": self.name, "label": self.label}) + "\n")

    def load(self, base, path: Path, *, seed: int = 0):
        from flexi_workflows.adapters.checkpoint import load_adapter

        return load_adapter(base, Path(path) / "adapter", policy=self.rank_policy(seed)).eval()

    def eval_ranks(self, model, batch: dict[str, np.ndarray], n: int) -> np.ndarray | None:
        return model.policy.ranks(n, training=False).numpy().astype(np.int64)

    def trainable_params(self, accounting: Accounting, artifact: Path) -> int:
        return accounting.params_per_rank * self.r_max

    def active_params(self, accounting: Accounting, artifact: Path, ranks_used: np.ndarray | None) -> dict[str, Any]:
        ranks = np.asarray(ranks_used, dtype=np.int64)
        mean_rank = float(ranks.mean())
        values, counts = np.unique(ranks, return_counts=True)
        return {
            "mean_rank": mean_rank,
            "mean_active_params": accounting.params_per_rank * mean_rank,
            "high_rank_rate": float((ranks == self.r_max).mean()),
            "rank_histogram": {str(int(k)): int(v) for k, v in zip(values, counts)},
        }


class LoraMethod(NestedLoraMethod):
    def rank_policy(self, seed: int):
        from flexi_workflows.adapters import StaticRank

        return StaticRank(self.config.rank)


class DyLoraMethod(NestedLoraMethod):
    """eval_rank only matters at inference: DyLoRA evaluated at 4 and at 8 share one training."""

    @property
    def label(self) -> str:
        eval_rank = self.config.eval_rank
        return self.train_label + (f"-at{eval_rank}" if eval_rank is not None and eval_rank != self.r_max else "")

    @property
    def train_label(self) -> str:
        return super().label

    def train_inputs(self) -> dict[str, Any]:
        return {k: v for k, v in super().train_inputs().items() if k != "eval_rank"}

    def rank_policy(self, seed: int):
        from flexi_workflows.adapters import DyLoRA

        c = self.config
        return DyLoRA(c.r_min, c.r_max, eval_rank=c.eval_rank or c.r_max, seed=seed)


class DyLoraPlusMethod(NestedLoraMethod):
    """One rank per evaluation batch too: the batch's place in its eval stream picks it (adapters/policies.py)."""

    eval_ranks_from_streams = True

    def rank_policy(self, seed: int):
        from flexi_workflows.adapters import DyLoRAPlus

        return DyLoRAPlus(self.config.r_min, self.config.r_max, seed=seed)

    def eval_ranks(self, model, batch: dict[str, np.ndarray], n: int) -> np.ndarray | None:
        if "eval_stream" not in batch:  # not from the evaluation stage: the next ranks of stream 0
            return super().eval_ranks(model, batch, n)
        streams, positions = np.asarray(batch["eval_stream"]), np.asarray(batch["stream_position"])
        return np.array([model.policy.eval_rank(int(k), int(p)) for k, p in zip(streams, positions)], dtype=np.int64)


class FlexiMethod(NestedLoraMethod):
    """Ranks come with each row (the router's class mapped through `ranks`), in training and evaluation."""

    @property
    def routing(self) -> str:
        return self.config.router

    @property
    def label(self) -> str:
        return super().label + ("-oracle" if self.routing == "oracle" else "")

    def rank_policy(self, seed: int):
        from flexi_workflows.adapters import FlexiRouted

        return FlexiRouted()

    def ranks_for(self, classes: Sequence[int]) -> np.ndarray:
        from flexi_workflows.router.assign import RankAssigner

        return RankAssigner(self.ranks)(np.asarray(classes, dtype=np.int64)).numpy().astype(np.int64)

    def eval_ranks(self, model, batch: dict[str, np.ndarray], n: int) -> np.ndarray | None:
        return np.asarray(batch["rank"], dtype=np.int64)
