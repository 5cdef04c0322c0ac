"""Layers point one way: config is plain data at the bottom, components know no recipe or trainer,
stages compose components, the pipeline and sweeps compose stages, the CLI sits on top.

Every import in the package — module level or inside a function — is checked against the layer
table; a new module must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flexi_workflows"

LAYERS = {
    "errors": 0, "fsutil": 0, "progress": 0, "storage": 0, "metrics": 0, "assets": 0,
    "recipes": 1, "audio": 1,
    "data": 2, "plots": 2, "adapters": 2, "tasks": 2, "scoring": 2,
    "models": 3, "report_plots": 3,
    "router": 4, "ray_cluster": 4, "placement_groups": 4,
    "methods": 5,
    "generation": 6, "training": 6,
    "stages": 7, "tracking": 7, "memory": 7,  # memory plans what training's DeepSpeed config will allocate
    "pipeline": 8, "report": 8,
    "sweep": 9, "export": 9,
    "cli": 10,
}
# components that must not know the recipe at all (they take plain arguments)
KNOW_NO_RECIPE = {"storage", "audio", "adapters", "models", "router", "data", "plots", "report_plots", "tracking", "metrics"}


def unit(module: str) -> str:
    return module.split(".")[1] if module.startswith("flexi_workflows.") and module.count(".") >= 1 else ""


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; use the absolute flexi_workflows.… path"
            if node.module == "flexi_workflows":  # from flexi_workflows import report
                found += [f"flexi_workflows.{a.name}" for a in node.names]
            elif node.module:
                found.append(node.module)
    return [m for m in found if m.startswith("flexi_workflows.")]


def test_every_import_points_down_or_sideways_within_its_unit():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        own = rel.parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        assert own in LAYERS, f"{rel}: give the unit {own!r} a layer in tests/test_layers.py"
        for module in imports(path):
            other = unit(module)
            if other == own:
                continue
            if LAYERS[other] >= LAYERS[own]:
                problems.append(f"{rel} imports {module} (layer {LAYERS[other]} ≥ its own {LAYERS[own]})")
            if own in KNOW_NO_RECIPE and other == "recipes":
                problems.append(f"{rel} imports {module}: {own} must not know the recipe")
    assert not problems, "\n".join(problems)
