"""Configuration of a Flexi-LoRA adapter.

The config is everything needed to rebuild an adapter's shapes and behaviour; it is saved as JSON
beside the safetensors weights, so a checkpoint is self-describing (like PEFT's adapter_config.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexi_workflows.errors import ConfigError

SCALINGS = ("alpha_over_r", "alpha_over_sqrt_r", "learned", "constant")

# Default target modules per Hugging Face `model_type`: the attention projections (paper §4 uses
# q, k, v, o on LLaMA; PEFT's own LLaMA default is q, v only, which does not give the paper's counts).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "whisper": ("q_proj", "k_proj", "v_proj", "out_proj"),
}


def default_targets(model_type: str) -> tuple[str, ...]:
    try:
        return DEFAULT_TARGETS[model_type]
    except KeyError:
        raise ConfigError(
            f"no default target modules for model_type {model_type!r}; pass targets explicitly "
            f"(defaults exist for: {', '.join(sorted(DEFAULT_TARGETS))})"
        ) from None


@dataclass
class FlexiLoraConfig:
    """Shapes and scaling of a Flexi-LoRA adapter.

    r_max: rows of A / columns of B; every per-sample rank r satisfies 1 <= r <= r_max.
    alpha: the LoRA alpha; the rank-specific scaling γ(r) is alpha/r, alpha/sqrt(r) (rsLoRA), a
        learned scalar per rank and layer initialised at alpha/r (the paper's "rank-specific scaling
        variable", §3), or "constant" alpha/r_max for every rank (no rank-specific scaling: a rank-r
        slice contributes exactly what it contributes inside the full adapter).
    targets: leaf names of the nn.Linear modules to adapt; None means the default for the model type.
    adapter_dtype: dtype of A and B; "float32" keeps adapters in fp32 over a bf16 base (as PEFT's
        autocast_adapter_dtype does), "base" uses the base weight's dtype.
    """

    r_max: int = 8
    alpha: float = 16.0
    scaling: str = "alpha_over_r"
    dropout: float = 0.0
    targets: list[str] | None = None
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.r_max, int) or isinstance(self.r_max, bool) or self.r_max < 1:
            raise ConfigError(f"adapter.r_max must be a positive integer, got {self.r_max!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ConfigError(f"adapter.alpha must be a positive number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if self.scaling not in SCALINGS:
            raise ConfigError(f"adapter.scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout!r}")
        if self.adapter_dtype not in ("float32", "base"):
            raise ConfigError(f"adapter.adapter_dtype must be 'float32' or 'base', got {self.adapter_dtype!r}")
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if self.targets is not None:
            self.targets = list(self.targets)
            if not self.targets:
                raise ConfigError("adapter.targets is empty; name at least one module or leave it unset")

    def gamma(self, rank: int) -> float:
        """The fixed scaling γ(r) (the learned variant starts here)."""
        if self.scaling == "alpha_over_sqrt_r":
            return self.alpha / math.sqrt(rank)
        if self.scaling == "constant":  # every rank at the full adapter's scale: a slice is exactly its share of r_max
            return self.alpha / self.r_max
        return self.alpha / rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "adapter config") -> "FlexiLoraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> "FlexiLoraConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        return cls.from_dict(data.get("adapter", data), source=str(path))
