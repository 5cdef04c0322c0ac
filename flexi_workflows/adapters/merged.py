"""Per-class merged inference: each rank's rows run on the base weights with that rank folded in.

A mixed-rank batch through `FlexiLoraModel` pays for an r_max LoRA in every adapted layer (and a mask).
Here the batch is split by rank instead; for each rank r the target layers' weights become
W + γ(r)·B[:, :r]·A[:r] in place and the wrapped modules are swapped back for the plain nn.Linear, so
that group generates on exactly the bare base model's module tree: no adapter matmuls, no wrapper.

    batch ──► rank groups {r: rows} ──► for each r: merge r ─► base_model.generate(rows)
                                                    ──► outputs back in row order, W restored bit for bit

Restoring is exact because the original weights are copied, not recomputed: (W + Δ) − Δ in floating
point is not W. The copy is in the weights' own dtype (already exact, so no fp32 copy is needed); it costs
one extra copy of the touched weights for as long as a rank is merged (LLaMA-3.2-1B's q/k/v/o in bf16:
16 layers × (2·2048² + 2·2048·512) × 2 bytes ≈ 0.34 GB), plus one layer's fp32 merge at a time. Each rank
is merged from the copy, so moving from one rank to the next costs one merge, not an unmerge and a merge.

The merged weight is computed as merge_and_unload computes it (fp32 sum, rounded once to the weight's
dtype), so a group sees the weights an exported merged model at that rank would have. In fp32 the
predictions equal the unmerged path's up to float rounding (the sum is associated differently), which
flips a greedy token only on a near-tie; in bf16 the merged weight is rounded to bf16 once more, an error
the size of the base weights' own rounding, so a near-tie flips more easily.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from flexi_workflows.adapters.layer import FlexiLoraLinear
from flexi_workflows.adapters.model import FlexiLoraModel, _set_submodule
from flexi_workflows.errors import RankError


def rank_groups(ranks: torch.Tensor | Sequence[int]) -> list[tuple[int, torch.Tensor]]:
    """(rank, row indices) for each rank present, lowest rank first; indices keep the rows' order."""
    ranks = torch.as_tensor(ranks, dtype=torch.long).flatten()
    return [(int(r), torch.nonzero(ranks == r).flatten()) for r in torch.unique(ranks).tolist()]


class RankMerger:
    """Folds one rank at a time into a FlexiLoraModel's base weights, in place, and puts them back exactly.

    While a rank is merged, `model.base_model` is the plain base model (its target modules are the
    original nn.Linear again) with merged weights; `restore()` puts back the original weights and the
    Flexi-LoRA layers. `generate_per_rank` restores in a finally block, so an exception restores too.
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
            if original is None:
                original = self._originals[name] = weight.detach().clone()
            merged = original.to(torch.float32) + layer.delta_weight(rank).to(torch.float32)
            weight.copy_(merged.to(weight.dtype))
            _set_submodule(self.model.base_model, name, layer.base_layer)
        self.rank = rank

    @torch.no_grad()
    def restore(self) -> None:
        """Every weight copied so far goes back and every Flexi-LoRA layer is put back in place (also after
        a merge that failed half-way)."""
        if not self._originals:
            return
        for name, original in self._originals.items():
            self.layers[name].base_layer.weight.copy_(original)
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
def generate_per_rank(
    model: FlexiLoraModel,
    ranks: torch.Tensor | Sequence[int] | int,
    inputs: dict[str, Any],
    generate: Callable[[torch.nn.Module, dict[str, Any]], Sequence[Any]],
) -> list[Any]:
    """Row b's output from `generate(base_model, group_inputs)` run with rank ranks[b] merged; in row order.

    `inputs` are the whole batch's model inputs (tensors with the batch first; anything else is passed
    to every group as is). Each group keeps its rows' tensors exactly as they are in the batch (same
    padding), so a row sees the same inputs as in the unmerged mixed batch. `generate` returns one
    output per row of the group, in the group's order. The weights are restored when this returns or raises.
    """
    n = _batch_size(inputs)
    ranks, _ = model.resolve_ranks(ranks, n, None, None)
    outputs: list[Any] = [None] * n
    merger = RankMerger(model)
    try:
        for rank, rows in rank_groups(ranks):
            merger.merge(rank)
            group = {k: v.index_select(0, rows.to(v.device))
                     if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
                     for k, v in inputs.items()}
            results = generate(model.base_model, group)
            if len(results) != len(rows):
                raise RankError(f"generate returned {len(results)} outputs for a group of {len(rows)} rows")
            for i, result in zip(rows.tolist(), results):
                outputs[i] = result
    finally:
        merger.restore()
    return outputs
