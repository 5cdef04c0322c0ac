"""The six methods of the paper's tables as one interface over a base model.

| method      | what trains                        | ranks in training         | ranks at inference   |
|-------------|------------------------------------|---------------------------|----------------------|
| full        | every base weight                  | -                         | -                    |
| lora        | Flexi-LoRA layers, StaticRank(r)   | r                         | r                    |
| dylora      | Flexi-LoRA layers, DyLoRA          | U[r_min, r_max] per batch | eval_rank (r_max)    |
| dylora_plus | Flexi-LoRA layers, DyLoRA+         | U[r_min, r_max] per batch | U[r_min, r_max]      |
| flexi       | Flexi-LoRA layers, router ranks    | per sample (router)       | per sample (router)  |
| adalora     | PEFT AdaLoRA (SVD-form LoRA)       | budget shrinks on schedule| final budget         |

LoRA-r is the nested adapter at a static rank, which is numerically PEFT's LoRA (tests/adapters
check this), so every LoRA-family baseline shares one code path and one parameter accounting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from flexi_workflows.adapters import DyLoRA, DyLoRAPlus, FlexiLoraConfig, FlexiRouted, StaticRank, inject_flexi_lora
from flexi_workflows.adapters.checkpoint import load_adapter, save_adapter
from flexi_workflows.adapters.model import FlexiLoraModel, resolve_targets
from flexi_workflows.adapters.policies import RankPolicy
from flexi_workflows.errors import ConfigError
from flexi_workflows.recipes.schema import MethodConfig

LORA_FAMILY = ("lora", "dylora", "dylora_plus", "flexi")


def method_label(method: MethodConfig) -> str:
    """A short unique name for a method's runs and folders: lora-8, flexi-2-8, dylora-1-8-at4, full."""
    if method.name == "full":
        return "full"
    label = "-".join([method.name.replace("_", "")] + [str(r) for r in method.ranks])
    if method.name == "dylora" and method.eval_rank is not None and method.eval_rank != method.r_max:
        label += f"-at{method.eval_rank}"
    return label


def rank_policy(method: MethodConfig, seed: int) -> RankPolicy:
    if method.name == "lora":
        return StaticRank(method.ranks[0])
    if method.name == "dylora":
        return DyLoRA(method.ranks[0], method.ranks[1], eval_rank=method.eval_rank or method.ranks[1], seed=seed)
    if method.name == "dylora_plus":
        return DyLoRAPlus(method.ranks[0], method.ranks[1], seed=seed)
    if method.name == "flexi":
        return FlexiRouted()
    raise ConfigError(f"method {method.name!r} has no rank policy")


def adapter_config(method: MethodConfig) -> FlexiLoraConfig:
    return FlexiLoraConfig(r_max=method.r_max, alpha=method.alpha, scaling=method.scaling, dropout=method.dropout,
                           targets=method.targets)


@dataclass
class Trainable:
    """The model handed to DeepSpeed / DDP plus what the loop needs to drive it."""

    model: nn.Module
    method: MethodConfig
    after_backward: Callable[[int], None] | None = None

    def forward_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
        if self.method.name == "flexi":
            kwargs["ranks"] = batch["ranks"]
        return kwargs


def build_trainable(base: nn.Module, method: MethodConfig, *, seed: int, total_steps: int) -> Trainable:
    if method.name == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return Trainable(base, method)
    if method.name in LORA_FAMILY:
        return Trainable(inject_flexi_lora(base, adapter_config(method), rank_policy(method, seed)), method)
    if method.name == "adalora":
        return _adalora(base, method, total_steps)
    raise ConfigError(f"unknown method {method.name!r}")


def adalora_schedule(total_steps: int) -> dict[str, int]:
    """PEFT AdaLoRA's budget schedule scaled to the run: warm up 10 %, prune until 70 %, then fixed."""
    tinit = max(1, int(0.1 * total_steps))
    tfinal = max(1, int(0.3 * total_steps))
    if tinit + tfinal >= total_steps:
        tinit, tfinal = 0, max(0, total_steps // 2)
    return {"tinit": tinit, "tfinal": tfinal, "deltaT": max(1, (total_steps - tinit - tfinal) // 10)}


def _adalora(base: nn.Module, method: MethodConfig, total_steps: int) -> Trainable:
    from peft import AdaLoraConfig, get_peft_model

    target_r = method.ranks[0]
    config = AdaLoraConfig(
        init_r=int(round(target_r * 1.5)),
        target_r=target_r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=resolve_targets(base, method.targets),
        total_step=max(total_steps, 2),
        **adalora_schedule(total_steps),
    )
    model = get_peft_model(base, config)

    def after_backward(step: int) -> None:
        model.base_model.update_and_allocate(step)

    return Trainable(model, method, after_backward)


# -- artifacts ------------------------------------------------------------------------------------

METHOD_FILE = "method.json"


def export_trained(model: nn.Module, method: MethodConfig, path: Path) -> None:
    """Write what evaluation needs into `path` (an existing folder)."""
    path.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"name": method.name, "ranks": method.ranks}
    if method.name in LORA_FAMILY:
        save_adapter(model, path / "adapter")
    elif method.name == "adalora":
        model.save_pretrained(str(path / "adalora"))
        info["active_params"] = adalora_active_params(model)
    else:
        model.save_pretrained(str(path / "model"), safe_serialization=True)
    (path / METHOD_FILE).write_text(json.dumps(info) + "\n")


def load_trained(base: nn.Module, method: MethodConfig, path: Path, *, seed: int = 0) -> nn.Module:
    """The trained model for evaluation: base + adapter (LoRA family, AdaLoRA) or the full weights."""
    path = Path(path)
    if method.name in LORA_FAMILY:
        return load_adapter(base, path / "adapter", policy=rank_policy(method, seed)).eval()
    if method.name == "adalora":
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(path / "adalora")).eval()
    from flexi_workflows.models.loading import load_model

    return load_model(path / "model").eval()


def adalora_active_params(model: nn.Module) -> int:
    """Parameters of AdaLoRA's final budget: Σ over adapted layers of kept rank × (in + out)."""
    total = 0
    for module in model.modules():
        ranknum = getattr(module, "ranknum", None)
        if ranknum is None or "default" not in ranknum:
            continue
        mask = module.lora_E["default"].detach().flatten() != 0
        total += int(mask.sum()) * (module.in_features + module.out_features)
    return total


def is_flexi_model(model: nn.Module) -> bool:
    return isinstance(model, FlexiLoraModel)
