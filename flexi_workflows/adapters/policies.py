"""Rank policies: the one mechanism that gives each batch its per-sample rank vector.

Every method of the paper's Table 1 is a policy over the same nested adapter:

| policy      | training                               | inference                      |
|-------------|----------------------------------------|--------------------------------|
| static      | r for every sample (LoRA-r)            | r                              |
| dylora      | one rank ~ U[r_min, r_max] per batch   | a fixed eval rank              |
| dylora_plus | one rank ~ U[r_min, r_max] per batch   | one random rank per batch      |
| flexi       | per-sample ranks from the router       | per-sample ranks from router   |

A policy returns a LongTensor of shape (batch,). Randomness comes from a policy-owned generator so a
seed reproduces the rank sequence without touching torch's global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import torch

from flexi_workflows.errors import ConfigError, RankError

RankFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


class RankPolicy:
    name: ClassVar[str]

    def ranks(
        self,
        batch_size: int,
        *,
        training: bool,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, r_max: int) -> None:
        """Raise if the policy can produce a rank outside [1, r_max]."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in fields(self) if f.init}}


def _check_range(what: str, lo: int, hi: int, r_max: int) -> None:
    if not (1 <= lo <= hi <= r_max):
        raise RankError(f"{what}: need 1 <= r_min <= r_max <= {r_max} (adapter r_max), got [{lo}, {hi}]")


@dataclass
class StaticRank(RankPolicy):
    """LoRA-r: every sample at rank r, in training and inference."""

    rank: int
    name: ClassVar[str] = "static"

    def validate(self, r_max: int) -> None:
        if not 1 <= self.rank <= r_max:
            raise RankError(f"static rank must be in [1, {r_max}], got {self.rank}")

    def ranks(self, batch_size, *, training, input_ids=None, attention_mask=None):
        return torch.full((batch_size,), self.rank, dtype=torch.long)


@dataclass
class _RandomBatchRank(RankPolicy):
    r_min: int
    r_max: int
    seed: int = 0
    _generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def validate(self, r_max: int) -> None:
        _check_range(self.name, self.r_min, self.r_max, r_max)

    def draw(self, batch_size: int) -> torch.Tensor:
        rank = int(torch.randint(self.r_min, self.r_max + 1, (1,), generator=self._generator))
        return torch.full((batch_size,), rank, dtype=torch.long)


@dataclass
class DyLoRA(_RandomBatchRank):
    """DyLoRA: a random rank per training batch (shared by the batch), a fixed rank at inference."""

    eval_rank: int = 0
    name: ClassVar[str] = "dylora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_rank == 0:
            self.eval_rank = self.r_max

    def validate(self, r_max: int) -> None:
        super().validate(r_max)
        if not 1 <= self.eval_rank <= r_max:
            raise RankError(f"dylora eval_rank must be in [1, {r_max}], got {self.eval_rank}")

    def ranks(self, batch_size, *, training, input_ids=None, attention_mask=None):
        if training:
            return self.draw(batch_size)
        return torch.full((batch_size,), self.eval_rank, dtype=torch.long)


@dataclass
class DyLoRAPlus(_RandomBatchRank):
    """DyLoRA+ (paper §3): a random rank per batch in training *and* inference."""

    name: ClassVar[str] = "dylora_plus"

    def ranks(self, batch_size, *, training, input_ids=None, attention_mask=None):
        return self.draw(batch_size)


@dataclass
class FlexiRouted(RankPolicy):
    """Flexi-LoRA: per-sample ranks from the difficulty router.

    In the pipeline the router runs in the data stage and the ranks travel with the batch (passed as
    `ranks=`); `rank_fn` lets a model route by itself, e.g. for interactive generation.
    """

    rank_fn: RankFn | None = None
    name: ClassVar[str] = "flexi"

    def ranks(self, batch_size, *, training, input_ids=None, attention_mask=None):
        if self.rank_fn is None:
            raise RankError(
                "the flexi policy needs per-sample ranks: pass ranks= (from the router) or attach a router"
            )
        if input_ids is None:
            raise RankError("the flexi policy routes on input_ids; none were given")
        return self.rank_fn(input_ids, attention_mask).long()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}


POLICIES: dict[str, type[RankPolicy]] = {
    p.name: p for p in (StaticRank, DyLoRA, DyLoRAPlus, FlexiRouted)
}


def policy_from_dict(data: dict[str, Any]) -> RankPolicy:
    data = dict(data)
    name = data.pop("name", None)
    if name not in POLICIES:
        raise ConfigError(f"unknown rank policy {name!r}; choose one of {sorted(POLICIES)}")
    try:
        return POLICIES[name](**data)
    except TypeError as exc:
        raise ConfigError(f"rank policy {name!r}: {exc}") from None
