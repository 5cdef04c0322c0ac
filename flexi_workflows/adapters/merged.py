"""Per-class merged inference: a mixed-rank batch generated in one decoding loop on merged base weights.

A mixed-rank batch through `FlexiLoraModel` pays for an r_max LoRA in every adapted layer (and a mask).
Here the batch's most common rank m is folded into the base weights instead, W_m = W + γ(m)·B[:, :m]·A[:m],
in place; the rows at every other rank r are sorted into one contiguous slice per rank and get, in the
same forward, only the difference between their rank's update and m's:

    x_r · (W_r − W_m)ᵀ = ((x_r · Aᵀ) ⊙ c_r) · Bᵀ,   c_r[j] = γ(r)·[j < r] − γ(m)·[j < m]

    batch ──► sort rows: rank m first, then one slice per other rank
          ──► merge m into W; each target layer becomes  y = x·W_mᵀ,  y[slice r] += (x[slice r]·a_r)·b
          ──► one base_model.generate(...)  ──► outputs back in row order, W restored bit for bit

So a single-rank batch runs on exactly the bare base model's module tree (plain nn.Linear, no adapter
matmuls), and a mixed one adds two rank-≤r_max matmuls on its minority rows per adapted layer: one
decoding loop either way, never one loop per rank (on a CPU or a latency-bound GPU a loop costs about
the same for 2 rows as for 8, so a loop per rank would cost a whole batch per rank).

Restoring is exact because the original weights are never written, not because Δ is subtracted
((W + Δ) − Δ in floating point is not W): while a rank is merged each touched weight parameter points at
a new tensor holding W + Δ, and restoring points it back at W's own tensor, with no copy. That costs one
extra copy of the touched weights for as long as a rank is merged (LLaMA-3.2-1B's q/k/v/o in bf16:
16 layers × (2·2048² + 2·2048·512) × 2 bytes ≈ 0.34 GB), plus one layer's fp32 merge at a time; a
RankMerger kept across batches (the evaluation stage keeps one per actor) reuses that copy's memory, and
holds it, for as long as it lives.

The merged weight is computed as merge_and_unload computes it (fp32 sum, rounded once to the weight's
dtype), so rows at rank m see the weights an exported merged model at that rank would have; the other
rows' correction is computed in the weights' dtype. In fp32 the predictions equal the unmerged path's
up to float rounding (the sums are associated differently), which flips a greedy token only on a
near-tie; in bf16 the merged weight is rounded to bf16 once more, an error the size of the base weights'
own rounding, so a near-tie flips more easily.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flexi_workflows.adapters.layer import FlexiLoraLinear
from flexi_workflows.adapters.model import FlexiLoraModel, _set_submodule
from flexi_workflows.errors import RankError


def rank_groups(ranks: torch.Tensor | Sequence[int]) -> list[tuple[int, torch.Tensor]]:
    """(rank, row indices) for each rank present, lowest rank first; indices keep the rows' order."""
    ranks = torch.as_tensor(ranks, dtype=torch.long).flatten()
    return [(int(r), torch.nonzero(ranks == r).flatten()) for r in torch.unique(ranks).tolist()]


def merge_order(ranks: torch.Tensor | Sequence[int]) -> tuple[int, torch.Tensor, list[tuple[int, int, int]]]:
    """The rank to merge (the most common; a tie goes to the lower rank), the row order that puts its rows
    first and every other rank's rows after them in one contiguous slice per rank (lowest rank first, rows
    in their order), and those slices as (rank, start, end) in the sorted batch."""
    groups = rank_groups(ranks)
    merged, _ = max(groups, key=lambda group: (len(group[1]), -group[0]))
    order, slices, start = [], [], 0
    for rank, rows in sorted(groups, key=lambda group: group[0] != merged):  # stable: lowest rank first
        order.append(rows)
        if rank != merged:
            slices.append((rank, start, start + len(rows)))
        start += len(rows)
    return merged, torch.cat(order), slices


class RankCorrectedLinear(nn.Module):
    """A target layer while a rank m is merged into its weight: y = x·W_mᵀ + b, and for each slice of rows
    at another rank r, y[slice] += (x[slice]·a_r)·b_r with a_r = (A ⊙ c_r)ᵀ, b_r = Bᵀ (module docstring).

    The slices are rows of the batch the ranks were given for; `generate` may repeat each row (beams,
    returned sequences: repeat_interleave) and a model may flatten (batch, seq) before a linear, so the
    rows seen here are n·k with each of the batch's rows k consecutive rows, and a slice is scaled by k."""

    def __init__(self, base_layer: nn.Linear, corrections: list[tuple[int, int, torch.Tensor, torch.Tensor]],
                 batch_size: int) -> None:
        super().__init__()
        self.weight, self.bias = base_layer.weight, base_layer.bias  # the merged weight itself, not a copy
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.corrections, self.batch_size = corrections, batch_size
        # (rows of x, rows of x flattened) → [(row slice, a, b)]: worked out once per shape, as a decoding
        # loop calls this layer with the same few shapes every step
        self._plans: dict[tuple[int, int], list[tuple[slice, torch.Tensor, torch.Tensor]]] = {}

    def _plan(self, rows: int, flat_rows: int) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
        if rows % self.batch_size:
            raise RankError(f"the ranks were given for {self.batch_size} rows but a layer saw {rows}")
        per = flat_rows // self.batch_size  # flattened rows per row of the batch: k · the flattened middle dims
        plan = self._plans[rows, flat_rows] = [(slice(start * per, end * per), a, b)
                                                for start, end, a, b in self.corrections]
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        plan = self._plans.get((x.shape[0], x2.shape[0]))
        if plan is None:
            plan = self._plan(x.shape[0], x2.shape[0])
        for rows, a, b in plan:
            y2[rows].addmm_(x2[rows] @ a, b)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, corrected slices={len(self.corrections)}"


class RankMerger:
    """Folds one rank at a time into a FlexiLoraModel's base weights, in place, and puts them back exactly.

    While a rank is merged, `model.base_model` is the plain base model (its target modules are the
    original nn.Linear again, or a RankCorrectedLinear over the same weight when `correct` gives other
    ranks' rows their difference) with merged weights; `restore()` puts back the original weights and the
    Flexi-LoRA layers. `generate_merged` restores in a finally block, so an exception restores too.
    """

    def __init__(self, model: FlexiLoraModel) -> None:
        if not isinstance(model, FlexiLoraModel):
            raise TypeError(f"merged inference needs a FlexiLoraModel, got {type(model).__name__}")
        self.model = model
        self.layers: dict[str, FlexiLoraLinear] = dict(model.flexi_layers())
        if not all(isinstance(layer, FlexiLoraLinear) for layer in self.layers.values()):
            raise RankError("the model already has a rank merged (another merger holds it); "
                            "restore that one first")
        self._check_untied()
        self.rank: int | None = None
        self._originals: dict[str, torch.Tensor] = {}
        # the tensors merged weights are written to, kept from one merge to the next: freshly allocated
        # ones cost a page fault per 4 KiB page on first write, more than the merge's own arithmetic
        self._buffers: dict[str, torch.Tensor] = {}

    def _check_untied(self) -> None:
        """A weight shared with another module (tied embeddings, a targeted lm_head) would change that
        module too; merge_and_unload has the same hazard, but here it would also outlive the group."""
        touched = {layer.base_layer.weight.data_ptr(): name for name, layer in self.layers.items()}
        if len(touched) != len(self.layers):
            raise RankError("two adapted layers share one weight tensor; merged inference cannot merge "
                            "them apart")
        for pname, param in self.model.base_model.named_parameters(remove_duplicate=False):
            owner = touched.get(param.data_ptr())
            if owner is not None and not pname.startswith(owner + ".base_layer."):
                raise RankError(f"the weight of {owner} is shared with {pname}; merged inference would "
                                "change both")

    @torch.no_grad()
    def merge(self, rank: int) -> None:
        r_max = self.model.adapter_config.r_max
        if not 1 <= rank <= r_max:
            raise RankError(f"merge rank must be in [1, {r_max}], got {rank}")
        if rank == self.rank:
            return
        for name, layer in self.layers.items():
            weight = layer.base_layer.weight
            original = self._originals.get(name)
            if original is None:  # the first merge: the weight's own tensor is kept aside, untouched
                original = self._originals[name] = weight.data
                merged = self._buffers.get(name)
                if merged is None or (merged.shape, merged.dtype, merged.device) != (
                        original.shape, original.dtype, original.device):
                    merged = self._buffers[name] = torch.empty_like(original)
            else:  # another rank: the previous rank's merged tensor is overwritten
                merged = weight.data
            if original.dtype == layer.lora_A.dtype == torch.float32:
                # delta_weight's (B·A)·γ and the sum, in place in one buffer: the same float operations
                torch.matmul(layer.lora_B[:, :rank], layer.lora_A[:rank], out=merged)
                merged.mul_(layer.gamma(rank)).add_(original)
            else:
                merged.copy_((original.to(torch.float32) + layer.delta_weight(rank).to(torch.float32)).to(original.dtype))
            weight.data = merged
            _set_submodule(self.model.base_model, name, layer.base_layer)
        self.rank = rank

    @torch.no_grad()
    def correct(self, slices: Sequence[tuple[int, int, int]], batch_size: int) -> None:
        """With a rank m merged, give the rows of each (rank r, start, end) slice of a `batch_size`-row batch
        their rank's update instead of m's: each target layer becomes a RankCorrectedLinear over its merged
        weight, until the next `merge` or `restore`."""
        merged = self.rank
        if merged is None:
            raise RankError("merge a rank before correcting other ranks' rows")
        for name, layer in self.layers.items():
            weight = layer.base_layer.weight
            corrections = []
            for rank, start, end in slices:
                width = max(rank, merged)
                coefficients = [float(layer.gamma(rank)) * (j < rank) - float(layer.gamma(merged)) * (j < merged)
                                for j in range(width)]
                a = layer.lora_A[:width] * torch.tensor(coefficients, dtype=layer.lora_A.dtype,
                                                        device=weight.device)[:, None]
                # transposed views: the matmuls read them as they are
                corrections.append((start, end, a.to(weight.dtype).t(), layer.lora_B[:, :width].to(weight.dtype).t()))
            _set_submodule(self.model.base_model, name, RankCorrectedLinear(layer.base_layer, corrections, batch_size))

    @torch.no_grad()
    def restore(self) -> None:
        """Every weight merged so far points at its original tensor again and every Flexi-LoRA layer is put
        back in place (also after a merge that failed half-way)."""
        if not self._originals:
            return
        for name, original in self._originals.items():
            self.layers[name].base_layer.weight.data = original
        for name, layer in self.layers.items():
            _set_submodule(self.model.base_model, name, layer)
        self._originals.clear()
        self.rank = None


def _batch_size(inputs: dict[str, Any]) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise RankError("cannot tell the batch size: the inputs hold no tensor")


@torch.no_grad()
def generate_merged(
    model: FlexiLoraModel,
    ranks: torch.Tensor | Sequence[int] | int,
    inputs: dict[str, Any],
    generate: Callable[[torch.nn.Module, dict[str, Any]], Sequence[Any]],
    merger: RankMerger | None = None,
) -> list[Any]:
    """Row b's output at rank ranks[b], from one `generate(base_model, sorted_inputs)` call on the base
    weights with the batch's most common rank merged in and the other rows corrected (module docstring).

    `inputs` are the whole batch's model inputs (tensors with the batch first; anything else is passed
    as is). Rows are only reordered: each keeps its tensors exactly as they are in the batch (same
    padding), so a row sees the same inputs as in the unmerged mixed batch. `generate` returns one output
    per row, in the order it was given them; they come back in the batch's order. The weights are
    restored when this returns or raises.

    A `merger` kept across calls (one per evaluation actor) writes every merge into the same buffers,
    which then stay allocated (one copy of the target weights) for as long as the merger does.
    """
    n = _batch_size(inputs)
    ranks, _ = model.resolve_ranks(ranks, n, None, None)
    merged, order, slices = merge_order(ranks)
    if merger is None:
        merger = RankMerger(model)
    elif merger.model is not model:
        raise RankError("the merger was made for another model")
    try:
        merger.merge(merged)
        if slices:
            merger.correct(slices, n)
        batch = {k: v.index_select(0, order.to(v.device))
                 if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
                 for k, v in inputs.items()}
        results = generate(model.base_model, batch)
        if len(results) != n:
            raise RankError(f"generate returned {len(results)} outputs for a batch of {n} rows")
    finally:
        merger.restore()
    outputs: list[Any] = [None] * n
    for i, result in zip(order.tolist(), results):
        outputs[i] = result
    return outputs
