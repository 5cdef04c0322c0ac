"""RankRouter: pooled input embedding → difficulty-class logits, with noise-added training.

    pooled (dim) ─ standardise ─► [noise if noise_on=pooled] ─► classifier ─► logits ─► [noise if noise_on=logits]

Standardisation uses the training features' mean / std (saved with the router), so one learning
rate works across base models whose embedding scales differ by orders of magnitude.

Noise, training only, ε ~ N(0, σ²) per element: multiplicative x' = x ⊙ (1 + ε) (default, the form
the same authors' PT-MoE router uses on logits) or additive x' = x + ε. σ = 0 is plain cross-entropy.

A router is saved as `router.safetensors` + `router.json`; the JSON records the embedding dim and
vocabulary size it was trained on, so loading it against another base model fails clearly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flexi_workflows.errors import ConfigError
from flexi_workflows.fsutil import atomic_dir
from flexi_workflows.router.pooling import masked_mean_pool

WEIGHTS = "router.safetensors"
CONFIG = "router.json"
POOLING = "masked_mean_input_embeddings"


@dataclass
class RouterSpec:
    embed_dim: int
    vocab_size: int
    class_names: list[str]
    classifier: str = "linear"
    hidden_size: int = 256
    noise_std: float = 0.0
    noise_type: str = "multiplicative"
    noise_on: str = "logits"
    pooling: str = POOLING
    base_model: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class RankRouter(nn.Module):
    def __init__(self, spec: RouterSpec) -> None:
        super().__init__()
        self.spec = spec
        k, d = spec.num_classes, spec.embed_dim
        if spec.classifier == "linear":
            self.classifier = nn.Linear(d, k)
        elif spec.classifier == "mlp":
            self.classifier = nn.Sequential(nn.Linear(d, spec.hidden_size), nn.GELU(), nn.Linear(spec.hidden_size, k))
        else:
            raise ConfigError(f"router.classifier must be 'linear' or 'mlp', got {spec.classifier!r}")
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_std", torch.ones(d))
        self.noise_generator: torch.Generator | None = None

    def set_feature_stats(self, features: torch.Tensor) -> None:
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-6) if len(features) > 1 else torch.ones_like(self.feature_std))

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.randn(x.shape, generator=self.noise_generator, device=x.device, dtype=x.dtype) * self.spec.noise_std
        return x * (1 + eps) if self.spec.noise_type == "multiplicative" else x + eps

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = (pooled.float() - self.feature_mean) / self.feature_std
        noisy = self.training and self.spec.noise_std > 0
        if noisy and self.spec.noise_on == "pooled":
            x = self._noise(x)
        logits = self.classifier(x)
        if noisy and self.spec.noise_on == "logits":
            logits = self._noise(logits)
        return logits

    @torch.no_grad()
    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            return self(pooled).argmax(-1)
        finally:
            self.train(was)

    @torch.no_grad()
    def route(self, embedding: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Per-sample difficulty classes for token ids: pool their embeddings, classify. (Which rank a
        class gets is the method's business — one router serves the (1,8) and (2,8) rank pairs alike.)"""
        pooled = masked_mean_pool(embedding(input_ids), attention_mask)
        return self.classify(pooled.to(self.feature_mean.device))


def save_router(router: RankRouter, path: str | Path) -> Path:
    with atomic_dir(path) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(dataclasses.asdict(router.spec), indent=2) + "\n")
    return Path(path)


def load_router(path: str | Path, base_config: Any = None) -> RankRouter:
    """Load a router; with `base_config` (a transformers config) check it fits that base model."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ConfigError(f"{path}: not a router folder (needs {CONFIG} and {WEIGHTS})")
    try:
        data = json.loads((path / CONFIG).read_text())
        data.pop("class_ranks", None)  # routers saved before ranks moved to the method
        spec = RouterSpec(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"{path / CONFIG}: not a router config ({exc})") from None
    if base_config is not None:
        check_router_fits(spec, base_config, path)
    router = RankRouter(spec)
    state = load_file(str(path / WEIGHTS))
    try:
        router.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{path / WEIGHTS}: weights do not match {CONFIG} ({str(exc).splitlines()[0]})") from None
    return router.eval()


def check_router_fits(spec: RouterSpec, base_config: Any, where: str | Path = "router") -> None:
    text_config = base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config
    dim = getattr(text_config, "hidden_size", None) or getattr(text_config, "d_model", None)
    vocab = getattr(text_config, "vocab_size", None)
    if dim != spec.embed_dim or vocab != spec.vocab_size:
        raise ConfigError(
            f"{where}: the router was trained on embeddings of dim {spec.embed_dim} and a vocabulary of "
            f"{spec.vocab_size}, but the base model has dim {dim} and vocabulary {vocab}; retrain the router "
            f"(`flexi route`) for this model"
        )
