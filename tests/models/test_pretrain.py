"""The built-in base model: deterministic builds, and a recorded accuracy that a fresh evaluation reproduces."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from flexi_workflows.models.pretrain import (
    BASE_EVAL,
    BUILTINS,
    PretrainSpec,
    pretrain_arith_model,
    resolve_builtin,
)

# small enough to build in seconds, trained long enough to solve some one-step problems
SMALL = PretrainSpec(hidden_size=96, layers=2, heads=4, intermediate_size=192, vocab_size=320, steps=300,
                     batch_size=32, lr=5e-3, rows=3000, eval_rows=40)


# determinism does not depend on how long it trains: a short build, twice
BRIEF = dataclasses.replace(SMALL, steps=40, rows=1000)


def test_two_builds_give_identical_weights_tokenizer_and_record(tmp_path):
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    a = pretrain_arith_model(tmp_path / "a", BRIEF)
    b = pretrain_arith_model(tmp_path / "b", BRIEF)
    for name in ("model.safetensors", "tokenizer.json", "config.json", BASE_EVAL):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # the build's fixed threads and deterministic kernels do not leak into the caller's process
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    record = json.loads((a / BASE_EVAL).read_text())
    assert record["rows"] == 40 and set(record["accuracy_by_level"]) == {"1", "2", "3", "4"}
    assert record["accuracy_all"] == pytest.approx((record["accuracy_easy"] + record["accuracy_hard"]) / 2)


def test_a_changed_task_generator_is_a_new_model_folder(tmp_path, monkeypatch):
    from flexi_workflows.tasks import arith

    monkeypatch.setitem(BUILTINS, "arith-small", SMALL)
    monkeypatch.setattr("flexi_workflows.models.pretrain.pretrain_arith_model",
                        lambda path, spec: (Path(path).mkdir(parents=True), (Path(path) / "model.safetensors").touch()))
    first = resolve_builtin("builtin:arith-small", tmp_path)
    assert resolve_builtin("builtin:arith-small", tmp_path) == first
    monkeypatch.setattr(arith, "GENERATOR_VERSION", arith.GENERATOR_VERSION + 1)
    assert resolve_builtin("builtin:arith-small", tmp_path) != first


def test_shipped_builtins_are_current():
    """The shipped copies are the built-ins the code describes: a changed spec or generator without
    `python -m flexi_workflows.models.pretrain` would silently send every first run into a long build."""
    from flexi_workflows.models.pretrain import BUILTIN_PREFIX, SHIPPED, SHIPPED_FILES, builtin_folder_name

    expected = {builtin_folder_name(BUILTIN_PREFIX + name, "~/.cache/flexi-workflows") for name in BUILTINS}
    assert {d.name for d in SHIPPED.iterdir() if d.is_dir()} == expected
    for name in expected:
        files = {f.name for f in (SHIPPED / name).iterdir()}
        assert "model.safetensors" in files and BASE_EVAL not in files and files <= set(SHIPPED_FILES), name



def test_the_readme_refresh_command_finds_the_shipped_copies_current():
    """The README's refresh command, verbatim: with current copies it builds nothing and lists them."""
    import subprocess

    from flexi_workflows.models.pretrain import SHIPPED
    from tests.conftest import REPO_ROOT

    before = {f: f.stat().st_mtime_ns for f in SHIPPED.rglob("*") if f.is_file()}
    done = subprocess.run([".venv/bin/python", "-m", "flexi_workflows.models.pretrain"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(done.stdout.split()) == sorted(str(d) for d in SHIPPED.iterdir() if d.is_dir())
    assert {f: f.stat().st_mtime_ns for f in SHIPPED.rglob("*") if f.is_file()} == before, "nothing rewritten"

def test_a_shipped_copy_is_installed_not_built(tmp_path, monkeypatch):
    """First use copies the shipped weights and measures the test record on this machine: the same
    record a build here writes, without the build."""
    from flexi_workflows.models import pretrain

    built = pretrain_arith_model(tmp_path / "built", BRIEF)
    monkeypatch.setitem(BUILTINS, "arith-small", BRIEF)
    shipped = tmp_path / "shipped"
    name = pretrain.builtin_folder_name("builtin:arith-small", tmp_path / "cache")
    (shipped / name).mkdir(parents=True)
    for file in built.iterdir():
        if file.name != BASE_EVAL:
            (shipped / name / file.name).write_bytes(file.read_bytes())
    monkeypatch.setattr(pretrain, "SHIPPED", shipped)
    monkeypatch.setattr(pretrain, "pretrain_arith_model", lambda *a: pytest.fail("built instead of installed"))
    folder = Path(resolve_builtin("builtin:arith-small", tmp_path / "cache"))
    assert folder.parent == tmp_path / "cache" and folder.name == name
    for file in ("model.safetensors", "tokenizer.json", BASE_EVAL):
        assert (folder / file).read_bytes() == (built / file).read_bytes(), file


@pytest.mark.slow
def test_recorded_accuracy_matches_the_pipelines_base_evaluation(tmp_path, monkeypatch, ray_local):
    """The folder's base_eval.json is what the pipeline's own (Ray Data) base evaluation measures."""
    from flexi_workflows.pipeline import prepare
    from flexi_workflows.recipes import Recipe
    from flexi_workflows.recipes.loader import build
    from flexi_workflows.stages.base import run_stage
    from flexi_workflows.stages.evaluate import METRICS
    from flexi_workflows.stages.plan import plan_pipeline

    monkeypatch.setitem(BUILTINS, "arith-small", SMALL)
    recipe = build(Recipe, {
        "name": "base-eval", "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": "builtin:arith-small", "cache_dir": str(tmp_path / "cache")},
        "task": {"name": "arith", "train": {"name": "arith", "split": "train", "limit": 40},
                 "eval": [{"name": "arith", "split": "test", "limit": SMALL.eval_rows}],
                 "max_prompt_tokens": 96, "max_target_tokens": 48},
        "method": {"name": "lora", "rank": 8, "dropout": 0.0},
        "evaluation": {"batch_size": 200, "max_new_tokens": 36},  # one batch, as the build evaluates
        "tracking": {"enabled": False},
    })
    recipe = prepare(recipe)
    recorded = json.loads((Path(recipe.model.name_or_path) / BASE_EVAL).read_text())
    assert recorded["accuracy_easy"] > 0  # a model that solves nothing would make the comparison empty
    fresh = run_stage(plan_pipeline(recipe).base_eval).read_json(METRICS)["datasets"]["arith"]
    assert fresh["accuracy"] == pytest.approx(recorded["accuracy_all"])
    for key in ("accuracy_easy", "accuracy_hard"):
        assert fresh[key] == pytest.approx(recorded[key]), key
