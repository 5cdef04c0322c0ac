"""Difficulty class → LoRA rank: the bridge from the router to the adapter's per-sample rank vector."""

from __future__ import annotations

from typing import Sequence

import torch

from flexi_workflows.errors import ConfigError


class RankAssigner:
    """Maps class k (0 = easiest) to class_ranks[k], e.g. (easy, hard) → (2, 8)."""

    def __init__(self, class_ranks: Sequence[int]) -> None:
        ranks = [int(r) for r in class_ranks]
        if not ranks or any(r < 1 for r in ranks):
            raise ConfigError(f"class ranks must be positive integers, got {list(class_ranks)}")
        self.class_ranks = ranks
        self._table = torch.tensor(ranks, dtype=torch.long)

    def __call__(self, classes: torch.Tensor) -> torch.Tensor:
        classes = torch.as_tensor(classes, dtype=torch.long)
        if classes.numel() and (classes.min() < 0 or classes.max() >= len(self.class_ranks)):
            raise ConfigError(f"class ids must be in [0, {len(self.class_ranks) - 1}]")
        return self._table.to(classes.device)[classes]

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self(logits.argmax(dim=-1))
