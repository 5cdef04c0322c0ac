"""Put Flexi-LoRA into any Hugging Face model, run it with per-sample ranks, take it out again.

`FlexiLoraModel` wraps the base model (as PEFT's PeftModel does): it swaps the target nn.Linear
modules for `FlexiLoraLinear`, freezes everything else, and sets the shared `RankState` around each
forward / generate call from an explicit `ranks=` argument or, when none is given, its rank policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from flexi_workflows.adapters.config import FlexiLoraConfig, default_targets
from flexi_workflows.adapters.layer import FlexiLoraLinear, RankState
from flexi_workflows.adapters.policies import RankPolicy, StaticRank
from flexi_workflows.errors import RankError, TargetModuleError

_BATCH_KEYS = ("input_ids", "inputs_embeds", "input_features", "decoder_input_ids")


def resolve_targets(model: nn.Module, targets: Sequence[str] | None) -> list[str]:
    if targets:
        return list(targets)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return list(default_targets(str(model_type)))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_target_linears(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Module]:
    """Modules whose qualified name ends with a target (leaf name or dotted suffix).

    Every target must match at least one nn.Linear; otherwise the error lists the linear layer names
    the model does have, so a typo (o_proj vs out_proj) is fixed in one try.
    """
    found: dict[str, nn.Module] = {}
    unmatched = []
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, FlexiLoraLinear))}
    for target in targets:
        hits = {n: m for n, m in linears.items() if _matches(n, target)}
        if not hits:
            unmatched.append(target)
        found.update(hits)
    if unmatched:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise TargetModuleError(
            f"target modules {unmatched} match no linear layer of this "
            f"{type(model).__name__}; its linear layers are named: {', '.join(leaf_names)}"
        )
    return found


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


class FlexiLoraModel(nn.Module):
    """A Hugging Face model with Flexi-LoRA layers and a rank policy.

    `model(**batch, ranks=r)` / `model.generate(**inputs, ranks=r)` where r is an int (whole batch),
    a sequence or LongTensor of shape (batch,), or None (ask the policy).
    """

    def __init__(
        self, base_model: nn.Module, config: FlexiLoraConfig, policy: RankPolicy | None = None
    ) -> None:
        super().__init__()
        self.base_model = base_model
        config = dataclasses.replace(config, targets=resolve_targets(base_model, config.targets))
        self.adapter_config = config
        self.rank_state = RankState(config)
        self.policy = policy or StaticRank(config.r_max)
        self.policy.validate(config.r_max)
        self.last_ranks: torch.Tensor | None = None  # the rank vector of the latest forward (for the training record)
        for param in base_model.parameters():
            param.requires_grad_(False)
        self.target_names = sorted(find_target_linears(base_model, config.targets))
        for name in self.target_names:
            base_layer = base_model.get_submodule(name)
            _set_submodule(base_model, name, FlexiLoraLinear(base_layer, config, self.rank_state))

    # -- attribute passthrough so the wrapper can stand in for the HF model ---------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def flexi_layers(self) -> Iterable[tuple[str, FlexiLoraLinear]]:
        for name in self.target_names:
            yield name, self.base_model.get_submodule(name)

    def set_policy(self, policy: RankPolicy) -> None:
        policy.validate(self.adapter_config.r_max)
        self.policy = policy

    def set_step(self, step: int) -> None:
        """Tell the policy the global optimizer step (0-based) the next training forwards belong to:
        DyLoRA / DyLoRA+ draw one rank per step from it."""
        self.policy.set_step(step)

    # -- ranks ----------------------------------------------------------------------------------
    def resolve_ranks(
        self, ranks: Any, batch_size: int, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, int | None]:
        """Validate ranks (or draw them from the policy); return them with the shared rank if uniform."""
        if ranks is None:
            ranks = self.policy.ranks(
                batch_size, training=self.training, input_ids=input_ids, attention_mask=attention_mask
            )
        if isinstance(ranks, int) and not isinstance(ranks, bool):
            ranks = torch.full((batch_size,), ranks, dtype=torch.long)
        elif not isinstance(ranks, torch.Tensor):
            ranks = torch.as_tensor(list(ranks))
        if ranks.dtype.is_floating_point or ranks.dtype == torch.bool:
            raise RankError(f"ranks must be integers, got dtype {ranks.dtype}")
        if ranks.dim() != 1 or ranks.shape[0] != batch_size:
            raise RankError(
                f"the rank vector must have shape (batch,) = ({batch_size},), got {tuple(ranks.shape)}"
            )
        lo, hi = (int(v) for v in torch.stack([ranks.min(), ranks.max()]).tolist())
        r_max = self.adapter_config.r_max
        if lo < 1 or hi > r_max:
            bad = lo if lo < 1 else hi
            raise RankError(f"rank {bad} is out of range: every rank must be in [1, {r_max}] (r_max)")
        return ranks.long(), (lo if lo == hi else None)

    @staticmethod
    def _batch_size(args: tuple, kwargs: dict) -> tuple[int, torch.Tensor | None]:
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        for key in _BATCH_KEYS:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor):
                return value.shape[0], input_ids
        if args and isinstance(args[0], torch.Tensor):
            return args[0].shape[0], input_ids
        raise RankError(f"cannot tell the batch size: pass one of {_BATCH_KEYS} as a keyword argument")

    def forward(self, *args: Any, ranks: Any = None, **kwargs: Any) -> Any:
        batch_size, input_ids = self._batch_size(args, kwargs)
        ranks, uniform = self.resolve_ranks(ranks, batch_size, input_ids, kwargs.get("attention_mask"))
        self.last_ranks = ranks
        if self.training and getattr(self.base_model, "is_activation_checkpointing", False):
            self.rank_state.hold(ranks, uniform)  # backward recomputes the blocks with these ranks
            return self.base_model(*args, **kwargs)
        with self.rank_state.using(ranks, uniform):
            return self.base_model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, ranks: Any = None, **kwargs: Any) -> Any:
        """HF generate() with per-sample ranks; beams / returned sequences inherit their input's rank."""
        batch_size, input_ids = self._batch_size(args, kwargs)
        ranks, uniform = self.resolve_ranks(ranks, batch_size, input_ids, kwargs.get("attention_mask"))
        with self.rank_state.using(ranks, uniform, expandable=True):
            return self.base_model.generate(*args, **kwargs)

    # -- taking the adapter out -----------------------------------------------------------------
    def unload(self) -> nn.Module:
        """Restore the original nn.Linear modules (adapter discarded); return the base model."""
        for name, layer in list(self.flexi_layers()):
            _set_submodule(self.base_model, name, layer.base_layer)
        self.target_names = []
        return self.base_model

    @torch.no_grad()
    def merge_and_unload(self, rank: int) -> nn.Module:
        """Fold rank `rank` into the base weights (W += γ(r)·B[:, :r]·A[:r]); return the plain base model."""
        if not 1 <= rank <= self.adapter_config.r_max:
            raise RankError(f"merge rank must be in [1, {self.adapter_config.r_max}], got {rank}")
        for _, layer in self.flexi_layers():
            weight = layer.base_layer.weight
            merged = weight.to(torch.float32) + layer.delta_weight(rank).to(torch.float32)
            weight.copy_(merged.to(weight.dtype))
        return self.unload()

    # -- what is trained --------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the adapter parameters, keyed by module path (`<module>.lora_A`, ...)."""
        state = {}
        for name, layer in self.flexi_layers():
            state[f"{name}.lora_A"] = layer.lora_A
            state[f"{name}.lora_B"] = layer.lora_B
            if layer.lora_gamma is not None:
                state[f"{name}.lora_gamma"] = layer.lora_gamma
        return state


def inject_flexi_lora(
    model: nn.Module, config: FlexiLoraConfig | None = None, policy: RankPolicy | None = None
) -> FlexiLoraModel:
    """Freeze `model`, add Flexi-LoRA to its target modules, return the wrapper."""
    return FlexiLoraModel(model, config or FlexiLoraConfig(), policy)
