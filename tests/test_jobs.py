"""The shipped recipes load, plan and (for sweeps) expand into valid trials — checked without running."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexi_workflows.methods import method_label
from flexi_workflows.recipes import load_recipe
from flexi_workflows.recipes.loader import to_dict
from flexi_workflows.stages.plan import plan_pipeline
from flexi_workflows.sweep.run import shared_stages, trial_recipe
from flexi_workflows.sweep.space import expand_space
from tests.conftest import REPO_ROOT

JOBS = sorted((REPO_ROOT / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_shipped_recipe_loads_and_plans(path: Path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # recipes name data relative to the project root
    recipe = load_recipe(path)
    labels = [method_label(m) for m in recipe.methods]
    assert len(set(labels)) == len(labels)
    plan = plan_pipeline(recipe)
    assert len({s.folder for s in plan.stages()}) >= len(plan.methods)
    if recipe.sweep is not None:
        trials = expand_space(recipe.sweep.space, num_samples=recipe.sweep.num_samples, seed=recipe.sweep.sample_seed)
        recipes = [trial_recipe(to_dict(recipe), t, str(path)) for t in trials]
        assert len({tuple(s.fingerprint for s in plan_pipeline(r).stages()) for r in recipes}) == len(trials)


@pytest.mark.parametrize("name", ["gsm8k-llama-3.2-1b", "gsm8k-llama-3.2-3b", "mrqa-llama-3.2-1b", "mrqa-llama-3.2-3b"])
def test_gpu_recipes_give_full_fine_tuning_its_own_learning_rate(name, monkeypatch):
    from flexi_workflows.stages.train import effective_lr

    monkeypatch.chdir(REPO_ROOT)
    recipe = load_recipe(REPO_ROOT / "jobs" / f"{name}.yaml")
    full = [m for m in recipe.methods if m.name == "full"]
    assert full, f"{name} compares full fine-tuning"
    assert effective_lr(recipe, full[0]) == 2e-5 < recipe.training.lr
    assert all(effective_lr(recipe, m) == recipe.training.lr for m in recipe.methods if m.name != "full")
    train = plan_pipeline(recipe).train_stage(full[0])
    assert train.inputs()["lr"] == 2e-5


def test_the_quickstart_sweep_shares_scoring_routers_and_baselines(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    path = REPO_ROOT / "jobs" / "sweep-quickstart.yaml"
    recipe = load_recipe(path)
    trials = expand_space(recipe.sweep.space)
    shared = shared_stages([trial_recipe(to_dict(recipe), t, str(path)) for t in trials])
    assert len(trials) == 6
    assert sorted(s.name for s in shared) == ["eval:base", "eval:lora-8", "route", "route", "route", "score",
                                              "train:lora-8"]


def test_the_benchmark_runs_every_method_over_three_seeds_and_shares_what_it_can(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    path = REPO_ROOT / "jobs" / "benchmark-arith.yaml"
    recipe = load_recipe(path)
    trials = expand_space(recipe.sweep.space)
    recipes = [trial_recipe(to_dict(recipe), t, str(path)) for t in trials]
    labels = {method_label(r.method) for r in recipes}
    assert labels == {"lora-2", "lora-4", "lora-8", "flexi-1-8", "flexi-2-8", "flexi-2-8-oracle", "dylora-1-8",
                      "dylora-1-8-at4", "dyloraplus-1-8", "adalora-8", "full"}
    assert sorted(r.seed for r in recipes) == sorted([0, 1, 2] * len(labels))
    shared = shared_stages(recipes)
    # scoring and the base evaluation once; per seed one router (both learned rank pairs) and one DyLoRA
    # training (evaluated at 8 and at 4)
    assert sorted(s.name for s in shared) == ["eval:base", "route", "route", "route", "score", "train:dylora-1-8",
                                              "train:dylora-1-8", "train:dylora-1-8"]
