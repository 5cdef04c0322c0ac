"""The route stage: router trained from the score stage's recorded artifacts; reuse and CLI."""

from __future__ import annotations

import json

import pytest
import yaml

from flexi_workflows.cli import main
from flexi_workflows.errors import ConfigError
from flexi_workflows.recipes import load_recipe
from flexi_workflows.router import load_router
from flexi_workflows.stages.route import run_route
from tests.helpers import record_scores


def _recipe_file(tmp_path, model_dir, n=80):
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for i in range(n):
            word = "zebra zebra" if i % 2 else "apple apple"
            f.write(json.dumps({"question": f"The {word} has {i % 12} plus 1?", "answer": f"#### {i % 12 + 1}"}) + "\n")
    recipe = {
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(model_dir)},
        "task": {"name": "math", "train": {"path": str(data)}},
        "method": {"name": "flexi", "ranks": [2, 8]},
        "router": {"epochs": 40, "noise_std": 0.1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_route_stage_trains_saves_and_reuses(tmp_path, tiny_model_dir, capsys):
    path = _recipe_file(tmp_path, tiny_model_dir)
    recipe = load_recipe(path)
    with pytest.raises(ConfigError, match="run `flexi score`"):
        run_route(recipe)
    record_scores(recipe)
    assert main(["route", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed
    first = run_route(recipe)
    assert first.cached and first.folder.parent == tmp_path / "out" / "route"
    out = first.folder
    report = json.loads((out / "report.json").read_text())
    assert report["holdout"]["accuracy"] >= 0.9
    assert report["train_class_counts"][0] == report["train_class_counts"][1], "balanced"
    router = load_router(out / "router")
    assert router.spec.class_names == ["easy", "hard"] and router.spec.noise_std == 0.1

    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert main(["route", str(path), "method.ranks=[1, 8]"]) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == mtime, "another rank pair: the same router, reused"
    assert main(["route", str(path), "router.noise_std=0.3"]) == 0
    retrained = run_route(load_recipe(path, ["router.noise_std=0.3"]))
    assert retrained.folder != out and load_router(retrained.folder / "router").spec.noise_std == 0.3
    assert (out / "manifest.json").stat().st_mtime_ns == mtime, "the σ=0.1 router stays for whoever needs it"


def test_score_cli_on_local_ray(tmp_path, tiny_model_dir, ray_local, capsys):
    path = _recipe_file(tmp_path, tiny_model_dir, n=6)
    assert main(["score", str(path), "scoring.max_new_tokens=3"]) == 0
    assert "scored 6 rows" in capsys.readouterr().out
    assert main(["score", str(path), "scoring.thresholds=[0.5, 0.2]"]) == 2
    assert "needs 1" in capsys.readouterr().err
