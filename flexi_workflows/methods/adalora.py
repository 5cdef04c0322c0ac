"""AdaLoRA through PEFT: SVD-form LoRA whose rank budget shrinks on a schedule (update_and_allocate at
each accumulation boundary, while the gradients are still there). It reads every parameter's gradient,
so it runs under DDP or ZeRO-0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from flexi_workflows.methods.base import Accounting, Method, Trainable
from flexi_workflows.methods.lora import METHOD_FILE


def adalora_schedule(total_steps: int) -> dict[str, int]:
    """PEFT AdaLoRA's budget schedule scaled to the run: warm up 10 %, prune until 70 %, then fixed."""
    tinit = max(1, int(0.1 * total_steps))
    tfinal = max(1, int(0.3 * total_steps))
    if tinit + tfinal >= total_steps:
        tinit, tfinal = 0, max(0, total_steps // 2)
    return {"tinit": tinit, "tfinal": tfinal, "deltaT": max(1, (total_steps - tinit - tfinal) // 10)}


def adalora_active_params(model) -> int:
    """Parameters of AdaLoRA's final budget: Σ over adapted layers of kept rank × (in + out)."""
    total = 0
    for module in model.modules():
        ranknum = getattr(module, "ranknum", None)
        if ranknum is None or "default" not in ranknum:
            continue
        mask = module.lora_E["default"].detach().flatten() != 0
        total += int(mask.sum()) * (module.in_features + module.out_features)
    return total


class AdaLoraMethod(Method):
    @property
    def label(self) -> str:
        return f"adalora-{self.config.rank}"

    def build(self, base, *, seed: int, total_steps: int) -> Trainable:
        from peft import AdaLoraConfig, get_peft_model

        from flexi_workflows.adapters.model import resolve_targets

        c = self.config
        config = AdaLoraConfig(
            init_r=c.init_rank or int(round(c.rank * 1.5)),
            target_r=c.rank,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=resolve_targets(base, c.targets),
            total_step=max(total_steps, 2),
            **adalora_schedule(total_steps),
        )
        model = get_peft_model(base, config)
        return Trainable(model, after_backward=model.base_model.update_and_allocate)

    def export(self, model, path: Path, state_dict: dict | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(path / "adalora"))
        info = {"name": self.name, "label": self.label, "active_params": adalora_active_params(model)}
        (path / METHOD_FILE).write_text(json.dumps(info) + "\n")

    def load(self, base, path: Path, *, seed: int = 0):
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(Path(path) / "adalora")).eval()

    def _budget(self, artifact: Path) -> int:
        return int(json.loads((Path(artifact) / METHOD_FILE).read_text())["active_params"])

    def trainable_params(self, accounting: Accounting, artifact: Path) -> int:
        return self._budget(artifact)

    def active_params(self, accounting: Accounting, artifact: Path, ranks_used: np.ndarray | None) -> dict[str, Any]:
        return {"mean_active_params": self._budget(artifact)}
