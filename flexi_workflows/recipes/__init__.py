"""Recipes: typed experiment descriptions loaded from YAML with `key.sub=value` overrides."""

from __future__ import annotations

from pathlib import Path

from flexi_workflows.recipes import loader
from flexi_workflows.recipes.schema import (
    AdaLoraConfig,
    DataSource,
    DyLoraConfig,
    DyLoraPlusConfig,
    FlexiConfig,
    FullConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    RayConfig,
    Recipe,
    RouterConfig,
    ScoringConfig,
    TaskConfig,
)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    return loader.load(Recipe, path, overrides)


__all__ = [
    "AdaLoraConfig",
    "DataSource",
    "DyLoraConfig",
    "DyLoraPlusConfig",
    "FlexiConfig",
    "FullConfig",
    "LoraConfig",
    "MethodConfig",
    "ModelConfig",
    "RayConfig",
    "Recipe",
    "RouterConfig",
    "ScoringConfig",
    "TaskConfig",
    "load_recipe",
]
