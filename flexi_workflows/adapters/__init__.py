"""Flexi-LoRA adapter core: the nested-rank layer, model injection, rank policies, accounting, I/O."""

from flexi_workflows.adapters.config import FlexiLoraConfig
from flexi_workflows.adapters.layer import FlexiLoraLinear, RankState
from flexi_workflows.adapters.model import FlexiLoraModel, inject_flexi_lora
from flexi_workflows.adapters.policies import DyLoRA, DyLoRAPlus, FlexiRouted, RankPolicy, StaticRank

__all__ = [
    "DyLoRA",
    "DyLoRAPlus",
    "FlexiLoraConfig",
    "FlexiLoraLinear",
    "FlexiLoraModel",
    "FlexiRouted",
    "RankPolicy",
    "RankState",
    "StaticRank",
    "inject_flexi_lora",
]
