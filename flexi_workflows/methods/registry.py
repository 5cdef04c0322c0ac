"""Method config (recipes/schema.py) → the class that implements it."""

from __future__ import annotations

from flexi_workflows.methods.adalora import AdaLoraMethod
from flexi_workflows.methods.base import Method
from flexi_workflows.methods.full import FullMethod
from flexi_workflows.methods.lora import DyLoraMethod, DyLoraPlusMethod, FlexiMethod, LoraMethod
from flexi_workflows.recipes.schema import MethodConfig

METHOD_CLASSES: dict[str, type[Method]] = {
    "full": FullMethod,
    "lora": LoraMethod,
    "adalora": AdaLoraMethod,
    "dylora": DyLoraMethod,
    "dylora_plus": DyLoraPlusMethod,
    "flexi": FlexiMethod,
}
assert set(METHOD_CLASSES) == set(MethodConfig.VARIANTS), "every method config needs its implementation"


def get_method(config: MethodConfig) -> Method:
    return METHOD_CLASSES[config.name](config)


def method_label(config: MethodConfig) -> str:
    return get_method(config).label
