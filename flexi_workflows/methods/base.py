"""What every fine-tuning method answers, so stages, workers and reports never ask which method it is.

A `Method` wraps its typed config (recipes/schema.py) and owns:
  label            lora-8, flexi-2-8, dylora-1-8-at4, full — the name of its runs and folders
  routing          where each row's rank comes from: None (the method's own policy), "learned" (the
                   trained router) or "oracle" (the scored difficulty classes)
  ranks_for        difficulty classes → ranks (flexi only; the router knows classes, not ranks)
  build            base model → what the optimizer trains (`Trainable`)
  export / load    the trained artifact a worker writes and evaluation reads back
  eval_ranks       the rank of each row of an evaluation batch (None: the method has no ranks)
  active_params    parameter accounting from the ranks actually used
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


@dataclass
class Accounting:
    """Parameter counts of the base model that every method's accounting reads from."""

    base_params: int
    params_per_rank: int

    @property
    def lora8_params(self) -> int:
        return 8 * self.params_per_rank


@dataclass
class Trainable:
    """The model handed to DeepSpeed / DDP plus what the loop needs to drive it."""

    model: Any
    uses_row_ranks: bool = False
    after_backward: Callable[[int], None] | None = None  # AdaLoRA: at each accumulation boundary, gradients still present
    # told the global optimizer step (0-based) before every micro-batch: DyLoRA / DyLoRA+ draw that step's rank
    set_step: Callable[[int], None] | None = None
    # the rank vector the latest forward used (methods on the nested adapter): the loop records it
    ranks_used: Callable[[], Any] | None = None

    def forward_kwargs(self, batch: dict) -> dict[str, Any]:
        if "input_features" in batch:  # speech (seq2seq): the decoder's inputs are the labels shifted right
            kwargs = {"input_features": batch["input_features"], "labels": batch["labels"]}
        else:
            kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
        if self.uses_row_ranks:
            kwargs["ranks"] = batch["ranks"]
        return kwargs


class Method:
    routing: str | None = None

    @property
    def needs_router(self) -> bool:
        """Training and evaluation need the trained router (the route stage)."""
        return self.routing == "learned"

    def __init__(self, config) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def label(self) -> str:
        raise NotImplementedError

    @property
    def train_label(self) -> str:
        """The label of what is trained: methods that differ only at inference share one training."""
        return self.label

    def train_inputs(self) -> dict[str, Any]:
        """The config fields that change training (the train stage's fingerprint; lr is counted apart)."""
        return {k: v for k, v in dataclasses.asdict(self.config).items() if k != "lr"}

    @property
    def ranks(self) -> list[int]:
        return list(self.config.rank_list)

    @property
    def targets(self) -> list[str] | None:
        return getattr(self.config, "targets", None)

    reports_ranks: bool = False  # evaluation reports mean_rank / high_rank_rate (the nested-adapter family)
    # eval ranks drawn per batch from one stream per evaluation actor (DyLoRA+): evaluation.num_actors matters
    eval_ranks_from_streams: bool = False
    # evaluation.merged can fold each rank into the base weights (the nested adapter: adapters/merged.py)
    merges_ranks: bool = False

    def ranks_for(self, classes: Sequence[int]) -> np.ndarray:
        raise TypeError(f"{self.label} does not route by difficulty class")

    def build(self, base, *, seed: int, total_steps: int) -> Trainable:
        raise NotImplementedError

    # the artifact is the whole model (full fine-tuning); else it reads only the trained parameters, all a
    # ZeRO-3 export has to gather
    exports_whole_model: bool = False

    def export(self, model, path: Path, state_dict: dict | None = None) -> None:
        """Write the artifact; `state_dict`, when given, holds the model's full values (its parameters are
        ZeRO-3 partitions)."""
        raise NotImplementedError

    def load(self, base, path: Path, *, seed: int = 0):
        raise NotImplementedError

    def eval_ranks(self, model, batch: dict[str, np.ndarray], n: int) -> np.ndarray | None:
        """The rank of each of the n rows of an evaluation batch. The batch's columns: `rank` (the router's,
        for methods that route), `eval_stream` and `stream_position` (the stream of the row's eval batch and
        the batch's place in it: see stages/evaluate.py)."""
        return None

    def trainable_params(self, accounting: Accounting, artifact: Path) -> int:
        raise NotImplementedError

    def active_params(self, accounting: Accounting, artifact: Path, ranks_used: np.ndarray | None) -> dict[str, Any]:
        """mean_active_params and, for methods with ranks, mean_rank / high_rank_rate / rank_histogram."""
        raise NotImplementedError
