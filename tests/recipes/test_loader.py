"""Recipe loading: typed sections, unknown keys with suggestions and line numbers, overrides."""

from __future__ import annotations

import pytest

from flexi_workflows.errors import ConfigError
from flexi_workflows.recipes import Recipe, load_recipe
from flexi_workflows.recipes.loader import build, flatten

GOOD = """\
name: demo
output_dir: out/demo
model:
  name_or_path: some/model
task:
  name: math
  train: {path: data/train.jsonl, limit: 100}
  eval:
    - {name: gsm8k, path: data/test.jsonl}
method:
  name: flexi
  ranks: [2, 8]
scoring:
  thresholds: [0.5]
router:
  noise_std: 0.2
"""


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_good_recipe_loads_into_typed_sections(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD))
    assert isinstance(recipe, Recipe)
    assert recipe.task.train.limit == 100 and recipe.task.eval[0].name == "gsm8k"
    assert recipe.router.noise_std == 0.2 and recipe.scoring.class_names == ["easy", "hard"]
    assert flatten(recipe)["method.ranks"] == [2, 8]


def test_overrides(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD), ["router.noise_std=0", "method.ranks=[1, 8]", "task.eval.0.limit=5",
                                                 "ray.address=auto"])
    assert recipe.router.noise_std == 0.0 and recipe.method.ranks == [1, 8]
    assert recipe.task.eval[0].limit == 5 and recipe.ray.address == "auto"


@pytest.mark.parametrize(
    "edit,message",
    [
        (("  noise_std: 0.2", "  noise_sdt: 0.2"), r"r\.yaml:16: unknown key 'router.noise_sdt'; did you mean 'router.noise_std'"),
        (("  thresholds: [0.5]", "  thresholds: 0.5"), r"r\.yaml:14: scoring.thresholds must be a list"),
        (("  noise_std: 0.2", "  noise_std: lots"), r"r\.yaml:16: router.noise_std must be a number, got 'lots'"),
        (("  ranks: [2, 8]", "  ranks: [8, 2]"), r"ranks must be strictly increasing"),
        (("  thresholds: [0.5]", "  thresholds: [0.8, 0.3]"), r"thresholds has 2 values but scoring.num_classes = 2 needs 1"),
        (("name: flexi", "name: flexy"), r"method.name must be one of .*did you mean 'flexi'"),
        (("  ranks: [2, 8]", "  ranks: [2, 4, 8]"), r"gives 3 ranks but scoring.num_classes is 2"),
    ],
)
def test_bad_recipes_name_the_key_and_line(tmp_path, edit, message):
    old, new = edit
    assert old in GOOD
    with pytest.raises(ConfigError, match=message):
        load_recipe(_write(tmp_path, GOOD.replace(old, new, 1)))


def test_bad_overrides(tmp_path):
    path = _write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"override 'router.nois_std=1'.*did you mean 'router.noise_std'"):
        load_recipe(path, ["router.nois_std=1"])
    with pytest.raises(ConfigError, match=r"override 'router.epochs=many': router.epochs must be an integer"):
        load_recipe(path, ["router.epochs=many"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_recipe(path, ["router.epochs"])


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"r\.yaml:2: not valid YAML"):
        load_recipe(_write(tmp_path, "a: [1\nb: 2\n"))
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        load_recipe(_write(tmp_path, "name: a\nname: b\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")


def test_build_from_dict_with_nested_dataclasses():
    recipe = build(Recipe, {"scoring": {"num_classes": 3, "thresholds": [0.8, 0.3], "num_samples": 5},
                            "method": {"ranks": [1, 4, 8]}})
    assert recipe.scoring.class_names == ["class0", "class1", "class2"]


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads `1e-4` as a string; learning rates are written that way in files and overrides."""
    path = tmp_path / "r.yaml"
    path.write_text("training: {lr: 1e-4}\nrouter: {lr: 5E-3}\n")
    recipe = load_recipe(path, ["training.weight_decay=1e-2"])
    assert recipe.training.lr == 1e-4 and recipe.router.lr == 5e-3 and recipe.training.weight_decay == 0.01
    assert load_recipe(path, ["training.lr=2e-5"]).training.lr == 2e-5
    assert load_recipe(path, ["name=1e3x"]).name == "1e3x", "only whole numbers are converted"


def test_a_search_space_key_is_overridden_whole(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("sweep:\n  space:\n    router.noise_std: [0.0, 0.1]\n  metric: accuracy_all\n")
    recipe = load_recipe(path, ["sweep.space.router.noise_std=[0.3]", "sweep.space.seed=[0, 1]"])
    assert recipe.sweep.space == {"router.noise_std": [0.3], "seed": [0, 1]}


def test_anchors_merge_keys_and_x_keys(tmp_path):
    """`x-` keys hold anchors and are dropped; `<<: *anchor` merges, explicit keys win; errors keep lines."""
    from flexi_workflows.recipes import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(
        "name: anchors\n"
        "x-adapter: &adapter {alpha: 32, dropout: 0.0, targets: [q_proj, v_proj]}\n"
        "model: {name_or_path: m}\n"
        "task: {name: math, train: {path: t.jsonl}, eval: [{path: e.jsonl}]}\n"
        "method: {name: lora, rank: 4, <<: *adapter, alpha: 8}\n"
        "compare:\n"
        "  - {name: flexi, ranks: [2, 8], <<: *adapter}\n"
    )
    recipe = load_recipe(path, [])
    assert (recipe.method.rank, recipe.method.alpha, recipe.method.targets) == (4, 8.0, ["q_proj", "v_proj"])
    assert (recipe.compare[0].alpha, recipe.compare[0].dropout) == (32.0, 0.0)
    path.write_text(path.read_text().replace("x-adapter: &adapter {alpha: 32,", "x-adapter: &adapter {alphaa: 32,"))
    with pytest.raises(ConfigError, match=r"r.yaml:\d+: unknown key 'method.alphaa'"):
        load_recipe(path, [])
