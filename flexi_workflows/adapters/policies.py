"""Rank policies: the one mechanism that gives each batch its per-sample rank vector.

Every method of the paper's Table 1 is a policy over the same nested adapter:

| policy      | training                                 | inference                                 |
|-------------|------------------------------------------|-------------------------------------------|
| static      | r for every sample (LoRA-r)              | r                                         |
| dylora      | one rank ~ U[r_min, r_max] per opt. step | a fixed eval rank                         |
| dylora_plus | one rank ~ U[r_min, r_max] per opt. step | one rank per batch from a seeded stream   |
| flexi       | per-sample ranks from the router         | per-sample ranks from the router          |

A policy returns a LongTensor of shape (batch,). Random draws never touch torch's global RNG:

* training (DyLoRA, DyLoRA+): the rank is a pure function of (seed, global optimizer step) —
  `step_rank` — and the training loop calls `set_step(step)` before every micro-batch, so every
  worker and every micro-batch of one optimizer step uses the same rank without communicating, and a
  resumed run draws what an uninterrupted one would have (DyLoRA's per-step callback, made stateless);
* inference (DyLoRA+): eval stream k is the sequence `eval_stream(seed, k, ...)`, seeded by
  SeedSequence([seed, k]): the evaluation stage gives each of its shards of eval batches (one per
  actor) its own stream, and the same seed repeats the same streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import numpy as np
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

    def set_step(self, step: int) -> None:
        """The global optimizer step the next training forwards belong to (0-based); only policies that
        draw a rank per step use it."""

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


# Domain tags keep the training draws and the evaluation streams of one seed independent.
_TRAIN, _EVAL = 0, 1


def _entropy(seed: int) -> int:
    return int(seed) % (1 << 64)  # SeedSequence takes non-negative integers; a negative recipe seed still works


def step_rank(seed: int, step: int, r_min: int, r_max: int) -> int:
    """The training rank of optimizer step `step` (0-based): uniform on [r_min, r_max], a pure function of
    (seed, step), so every worker and micro-batch of that step agrees without communication."""
    if step < 0:
        raise RankError(f"optimizer step must be ≥ 0, got {step}")
    rng = np.random.default_rng(np.random.SeedSequence([_entropy(seed), _TRAIN, int(step)]))
    return int(rng.integers(r_min, r_max + 1))


def eval_stream(seed: int, stream: int, length: int, r_min: int, r_max: int) -> np.ndarray:
    """The first `length` ranks of evaluation stream `stream` (one rank per eval batch), uniform on
    [r_min, r_max] from SeedSequence([seed, stream]): streams differ from each other, the same seed
    repeats them, and a longer draw extends a shorter one (prefix-stable)."""
    if stream < 0:
        raise RankError(f"eval stream index must be ≥ 0, got {stream}")
    rng = np.random.default_rng(np.random.SeedSequence([_entropy(seed), _EVAL, int(stream)]))
    return rng.integers(r_min, r_max + 1, size=length).astype(np.int64)


@dataclass
class _RandomBatchRank(RankPolicy):
    r_min: int
    r_max: int
    seed: int = 0
    step: int | None = field(default=None, init=False, compare=False)

    def validate(self, r_max: int) -> None:
        _check_range(self.name, self.r_min, self.r_max, r_max)

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def training_ranks(self, batch_size: int) -> torch.Tensor:
        if self.step is None:
            raise RankError(
                f"the {self.name} policy draws one rank per optimizer step: call model.set_step(step) "
                f"(the global optimizer step) before a training forward"
            )
        return torch.full((batch_size,), step_rank(self.seed, self.step, self.r_min, self.r_max), dtype=torch.long)


@dataclass
class DyLoRA(_RandomBatchRank):
    """DyLoRA: a random rank per optimizer step (shared by every worker and micro-batch), a fixed rank at inference."""

    eval_rank: int = 0
    name: ClassVar[str] = "dylora"

    def __post_init__(self) -> None:
        if self.eval_rank == 0:
            self.eval_rank = self.r_max

    def validate(self, r_max: int) -> None:
        super().validate(r_max)
        if not 1 <= self.eval_rank <= r_max:
            raise RankError(f"dylora eval_rank must be in [1, {r_max}], got {self.eval_rank}")

    def ranks(self, batch_size, *, training, input_ids=None, attention_mask=None):
        if training:
            return self.training_ranks(batch_size)
        return torch.full((batch_size,), self.eval_rank, dtype=torch.long)


@dataclass
class DyLoRAPlus(_RandomBatchRank):
    """DyLoRA+ (paper §3): a random rank per optimizer step in training, a random rank per batch at inference.

    At inference `eval_rank(stream, position)` is the rank of the position-th batch of eval stream
    `stream` (what the evaluation stage uses); a plain eval-mode forward without one (e.g. the
    validation loss) takes the next rank of stream 0.
    """

    name: ClassVar[str] = "dylora_plus"
    _streams: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _position: int = field(default=0, init=False, repr=False, compare=False)

    def eval_rank(self, stream: int, position: int) -> int:
        drawn = self._streams.get(stream)
        if drawn is None or position >= len(drawn):
            drawn = eval_stream(self.seed, stream, max(64, 2 * (position + 1)), self.r_min, self.r_max)
            self._streams[stream] = drawn
        return int(drawn[position])

    def ranks(self, batch_size, *, training, input_ids=None, attention_mask=None):
        if training:
            return self.training_ranks(batch_size)
        rank = self.eval_rank(0, self._position)
        self._position += 1
        return torch.full((batch_size,), rank, dtype=torch.long)


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
