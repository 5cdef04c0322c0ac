"""A recipe → its stage graph, with every fingerprint known before anything runs.

    score ──► route ──┬──► train:flexi-2-8 ──► eval:flexi-2-8
          │           └──► train:flexi-1-8 ──► eval:flexi-1-8      (one router, two rank maps)
          └──────────────► train:flexi-2-8-oracle ──► eval:flexi-2-8-oracle   (scored classes,
    eval:base ─────────────────────────────────────────┘            base's own grades on eval items)
              train:lora-8 ──► eval:lora-8                         (no router needed)

Planning reads configs and file digests only (no Ray, no model weights), so a sweep can plan all
its trials, see which stages they share, and run each shared stage once before the trials start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flexi_workflows.errors import ConfigError
from flexi_workflows.methods import get_method
from flexi_workflows.recipes.schema import MethodConfig, Recipe
from flexi_workflows.stages.base import Stage
from flexi_workflows.stages.evaluate import EvalStage
from flexi_workflows.stages.route import RouteStage
from flexi_workflows.stages.score import ScoreStage
from flexi_workflows.stages.train import TrainStage


@dataclass
class MethodStages:
    config: MethodConfig
    train: TrainStage
    eval: EvalStage

    @property
    def label(self) -> str:
        return self.eval.label


@dataclass
class Plan:
    recipe: Recipe
    score: ScoreStage
    route: RouteStage
    base_eval: EvalStage
    methods: list[MethodStages] = field(default_factory=list)

    @property
    def needs_router(self) -> bool:
        return any(get_method(m.config).needs_router for m in self.methods)

    @property
    def needs_oracle(self) -> bool:
        return any(get_method(m.config).routing == "oracle" for m in self.methods)

    def stages(self) -> list[Stage]:
        """Every stage the pipeline runs, in an order that respects dependencies."""
        out: list[Stage] = [self.score] if self.needs_router or self.needs_oracle else []
        if self.needs_router:
            out.append(self.route)
        if self.recipe.evaluation.include_base or self.needs_oracle:
            out.append(self.base_eval)
        for m in self.methods:
            out += [m.train, m.eval]
        return out

    def _find(self, method: MethodConfig) -> MethodStages:
        label = get_method(method).label
        for m in self.methods:
            if m.label == label:
                return m
        raise ConfigError(f"method {label} is not in this recipe; it has: {', '.join(m.label for m in self.methods)}")

    def train_stage(self, method: MethodConfig) -> TrainStage:
        return self._find(method).train

    def eval_stage(self, method: MethodConfig) -> EvalStage:
        return self._find(method).eval


def plan_pipeline(recipe: Recipe) -> Plan:
    labels = [get_method(m).label for m in recipe.methods]
    duplicated = sorted({x for x in labels if labels.count(x) > 1})
    if duplicated:
        raise ConfigError(f"method and compare name the same method twice: {', '.join(duplicated)}")
    score = ScoreStage(recipe)
    route = RouteStage(recipe, score)
    plan = Plan(recipe, score, route, EvalStage(recipe, None))
    for config in recipe.methods:
        train = TrainStage(recipe, config, route, score)
        plan.methods.append(MethodStages(config, train, EvalStage(recipe, config, train, route, plan.base_eval)))
    return plan
