"""Flexi-LoRA linear layer: one LoRA of rank r_max whose first r_b rows / columns serve sample b.

            x  (batch, ..., in)
            │
     ┌──────┴───────────────────────┐
     │                              │ dropout
     │                       A  (r_max × in)      random init
     W  (frozen)                    │ h = A·x      (batch, ..., r_max)
     │                       h ⊙ m_b,  m_b[j] = γ(r_b) · [j < r_b]
     │                              │
     │                       B  (out × r_max)     zero init
     └─────────── + ────────────────┘
                  y = W·x + B·(m_b ⊙ A·x)

Sample b therefore sees exactly  W + γ(r_b) · B[:, :r_b] · A[:r_b]  (paper §3, "Input-adaptive LoRA"):
the rank is one tensor op per layer, never a Python loop over samples, so a mixed-rank batch costs one
LoRA of rank r_max and autograd gives rows/columns ≥ r_b no gradient from sample b. When the whole
batch shares one rank r the layer slices A[:r], B[:, :r] instead (the uniform fast path), which is
cheaper than an r_max LoRA.

The per-sample ranks live in a `RankState` shared by all layers of one model; the model wrapper sets
it around each forward / generate call, so HF models need no new forward arguments.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from flexi_workflows.adapters.config import FlexiLoraConfig
from flexi_workflows.errors import RankError


class RankState:
    """The rank vector of the batch being processed, shared by every Flexi-LoRA layer of a model.

    `expandable` lets the batch be a whole multiple of the rank vector: `generate()` repeats each
    input for beams / returned sequences with repeat_interleave, so sample b's rank is repeated the
    same way. Plain forwards stay strict, so a wrong-length rank vector is an error, not a broadcast.
    """

    def __init__(self, config: FlexiLoraConfig) -> None:
        self.r_max = config.r_max
        self.gamma_values = [0.0] + [config.gamma(r) for r in range(1, config.r_max + 1)]
        self.gamma_table = torch.tensor(self.gamma_values)
        self.ranks: torch.Tensor | None = None
        self.uniform: int | None = None
        self.expandable = False
        self._cache: dict[tuple, torch.Tensor] = {}

    @contextmanager
    def using(self, ranks: torch.Tensor, uniform: int | None, expandable: bool = False) -> Iterator[None]:
        previous = (self.ranks, self.uniform, self.expandable, self._cache)
        self.ranks, self.uniform, self.expandable, self._cache = ranks, uniform, expandable, {}
        try:
            yield
        finally:
            self.ranks, self.uniform, self.expandable, self._cache = previous

    def hold(self, ranks: torch.Tensor, uniform: int | None) -> None:
        """Set the ranks until the next call, not just for one: under activation checkpointing the layers
        run again during backward, after the forward call has returned, and must see the same ranks."""
        self.ranks, self.uniform, self.expandable, self._cache = ranks, uniform, False, {}

    def ranks_for(self, n: int, device: torch.device) -> torch.Tensor:
        key = ("ranks", n, device)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        ranks = self.ranks
        if ranks is None:
            raise RankError(
                "a Flexi-LoRA layer ran with no ranks set; call the FlexiLoraModel wrapper "
                "(model(..., ranks=...) or model.generate(..., ranks=...)), not the inner base model"
            )
        if ranks.shape[0] != n:
            if self.expandable and n % ranks.shape[0] == 0:
                ranks = ranks.repeat_interleave(n // ranks.shape[0])
            else:
                raise RankError(f"the rank vector has {ranks.shape[0]} entries but the batch has {n} samples")
        ranks = ranks.to(device)
        self._cache[key] = ranks
        return ranks

    def mask(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(n, r_max) 0/1 mask: column j is active for sample b iff j < r_b."""
        key = ("mask", n, device, dtype)
        cached = self._cache.get(key)
        if cached is None:
            ranks = self.ranks_for(n, device)
            cached = (torch.arange(self.r_max, device=device) < ranks[:, None]).to(dtype)
            self._cache[key] = cached
        return cached

    def multiplier(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(n, r_max) mask already scaled by the fixed γ(r_b); computed once per call, used by all layers."""
        key = ("mult", n, device, dtype)
        cached = self._cache.get(key)
        if cached is None:
            ranks = self.ranks_for(n, device)
            gamma = self.gamma_table.to(device=device, dtype=dtype)[ranks]
            cached = self.mask(n, device, dtype) * gamma[:, None]
            self._cache[key] = cached
        return cached


class FlexiLoraLinear(nn.Module):
    """Wraps a frozen nn.Linear with a nested LoRA whose active rank is chosen per sample."""

    def __init__(self, base_layer: nn.Linear, config: FlexiLoraConfig, rank_state: RankState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r_max = config.r_max
        self.scaling = config.scaling
        self.rank_state = rank_state
        weight = base_layer.weight
        dtype = torch.float32 if config.adapter_dtype == "float32" else weight.dtype
        device = weight.device
        self.lora_A = nn.Parameter(torch.empty(config.r_max, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r_max, dtype=dtype, device=device))
        if device.type != "meta":
            # PEFT's initialisation for A (kaiming-uniform, a=√5); B = 0 so training starts at the base model.
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if config.scaling == "learned":
            init = torch.tensor([config.alpha / r for r in range(1, config.r_max + 1)], dtype=dtype)
            self.lora_gamma = nn.Parameter(init.to(device))
        else:
            self.lora_gamma = None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def gamma(self, rank: int) -> torch.Tensor | float:
        if self.lora_gamma is not None:
            return self.lora_gamma[rank - 1]
        return self.rank_state.gamma_values[rank]

    def delta_weight(self, rank: int) -> torch.Tensor:
        """γ(r) · B[:, :r] · A[:r], the dense update that rank r adds to W (used by merge)."""
        return (self.lora_B[:, :rank] @ self.lora_A[:rank]) * self.gamma(rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        lora_dtype = self.lora_A.dtype
        h_in = self.dropout(x.to(lora_dtype))
        rank = self.rank_state.uniform
        if rank is not None:
            # Uniform fast path: a rank-r LoRA, no mask.
            h = F.linear(h_in, self.lora_A[:rank]) * self.gamma(rank)
            return result + F.linear(h, self.lora_B[:, :rank]).to(result.dtype)
        n = x.shape[0]
        if self.lora_gamma is None:
            mult = self.rank_state.multiplier(n, x.device, lora_dtype)
        else:
            ranks = self.rank_state.ranks_for(n, x.device)
            mult = self.rank_state.mask(n, x.device, lora_dtype) * self.lora_gamma[ranks - 1][:, None]
        h = F.linear(h_in, self.lora_A)
        h = h * mult.view(n, *([1] * (h.dim() - 2)), self.r_max)
        return result + F.linear(h, self.lora_B).to(result.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r_max={self.r_max}, scaling={self.scaling}"
