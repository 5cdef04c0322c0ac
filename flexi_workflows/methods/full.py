"""Full fine-tuning: every base weight trains; the artifact is the whole model (safetensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from flexi_workflows.methods.base import Accounting, Method, Trainable
from flexi_workflows.methods.lora import METHOD_FILE


class FullMethod(Method):
    @property
    def label(self) -> str:
        return "full"

    def build(self, base, *, seed: int, total_steps: int) -> Trainable:
        for p in base.parameters():
            p.requires_grad_(True)
        return Trainable(base)

    exports_whole_model = True

    def export(self, model, path: Path, state_dict: dict | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(path / "model"), state_dict=state_dict, safe_serialization=True)
        (path / METHOD_FILE).write_text(json.dumps({"name": self.name, "label": self.label}) + "\n")

    def load(self, base, path: Path, *, seed: int = 0):
        from flexi_workflows.models.loading import load_model

        return load_model(Path(path) / "model").eval()

    def trainable_params(self, accounting: Accounting, artifact: Path) -> int:
        return accounting.base_params

    def active_params(self, accounting: Accounting, artifact: Path, ranks_used: np.ndarray | None) -> dict[str, Any]:
        return {"mean_active_params": accounting.base_params}
