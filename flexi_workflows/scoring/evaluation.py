"""Generation with a trained method: the evaluation stage's Ray Data actor.

Extends `BatchGenerator` (same prompts, tokenization and greedy decoding as scoring) with the
trained artifact and the rank each input gets: Flexi — the router's rank, computed upstream and
carried in the batch's `rank` column; LoRA-r, DyLoRA — the policy's fixed rank; DyLoRA+ — a random
rank per batch from its seeded policy. The ranks actually used come back as a column, so mean
active parameters are measured, not assumed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flexi_workflows.scoring.generation import BatchGenerator


class MethodGenerator(BatchGenerator):
    def __init__(self, model_ref: str, task_name: str, *, method: dict[str, Any], artifact_dir: str, seed: int = 0,
                 **kwargs: Any) -> None:
        from flexi_workflows.recipes.loader import build
        from flexi_workflows.recipes.schema import MethodConfig
        from flexi_workflows.training.methods import is_flexi_model, load_trained

        super().__init__(model_ref, task_name, **kwargs)
        self.method = build(MethodConfig, method, source="method")
        self.model = load_trained(self.model, self.method, artifact_dir, seed=seed).to(self.device).eval()
        self.uses_ranks = is_flexi_model(self.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = self.prompts(batch)
        n = len(prompts)
        if not self.uses_ranks:
            predictions = self.generate(prompts)
            ranks = np.zeros(n, dtype=np.int64)
        else:
            if self.method.name == "flexi":
                ranks = np.asarray(batch["rank"], dtype=np.int64)
            else:
                ranks = self.model.policy.ranks(n, training=False).numpy()
            predictions = self.generate(prompts, ranks=ranks.tolist())
        return {"id": np.asarray(batch["id"]), "prompt": np.asarray(prompts), "prediction": np.asarray(predictions),
                "rank": ranks}
