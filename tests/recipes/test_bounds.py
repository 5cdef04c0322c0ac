"""Every number in a recipe has a range, and a value outside it is refused where it is written."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from flexi_workflows.errors import ConfigError
from flexi_workflows.recipes import Recipe, load_recipe, schema
from flexi_workflows.recipes.bounds import bound_for

RECIPE = """\
name: demo
output_dir: out/demo
model: {name_or_path: some/model}
task:
  name: math
  train: {path: data/train.jsonl}
method: {name: flexi, ranks: [2, 8]}
training:
  lr: 1e-4
"""


def _numeric_fields():
    """(class, field) for every int/float (or list of them) field the loader can build."""
    seen, out = set(), []

    def walk(cls):
        if cls in seen:
            return
        seen.add(cls)
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if not field.init:
                continue
            args = {a for t in typing.get_args(hints[field.name]) or (hints[field.name],)
                    for a in typing.get_args(t) or (t,)}
            if args & {int, float}:
                out.append((cls, field.name))
            for arg in args:
                if dataclasses.is_dataclass(arg):
                    walk(arg)
        for sub in cls.__subclasses__():
            walk(sub)

    walk(Recipe)
    walk(schema.MethodConfig)
    return out


def test_every_number_in_the_schema_has_a_bound():
    fields = _numeric_fields()
    assert len(fields) > 60  # the walk reaches the method variants and nested sections
    missing = [f"{cls.__name__}.{name}" for cls, name in fields if bound_for(cls, name) is None]
    assert not missing, f"add a bound to flexi_workflows/recipes/bounds.py for: {missing}"


@pytest.mark.parametrize("override,message", [
    ("evaluation.batch_size=0", "evaluation.batch_size must be ≥ 1, got 0"),
    ("scoring.batch_size=-4", "scoring.batch_size must be ≥ 1, got -4"),
    ("seed=-1", "seed must be ≥ 0, got -1"),
    ("method.dropout=1.5", "method.dropout must be ≥ 0 and < 1, got 1.5"),
    ("method.dropout=1", "method.dropout must be ≥ 0 and < 1, got 1"),
    ("training.lr=.nan", "training.lr must be a finite number, got nan"),
    ("training.lr=.inf", "training.lr must be a finite number, got inf"),
    ("training.lr=0", "training.lr must be > 0, got 0"),
    ("method.lr=-1e-3", "method.lr must be > 0, got -0.001"),
    ("task.max_prompt_tokens=0", "task.max_prompt_tokens must be ≥ 1, got 0"),
    ("task.max_target_tokens=0", "task.max_target_tokens must be ≥ 1, got 0"),
    ("ray.num_cpus=0", "ray.num_cpus must be ≥ 1, got 0"),
    ("method.ranks=[0, 8]", "method.ranks.0 must be ≥ 1, got 0"),
    ("compare=[{name: lora, rank: 0}]", "compare.0.rank must be ≥ 1, got 0"),
    ("training.warmup_ratio=1", "training.warmup_ratio must be ≥ 0 and < 1, got 1"),
    ("distribution.cpus_per_worker=0", "distribution.cpus_per_worker must be > 0, got 0"),
    ("scoring.top_p=0", "scoring.top_p must be > 0 and ≤ 1, got 0"),
    ("task.train.limit=0", "task.train.limit must be ≥ 1, got 0"),
    ("scoring.thresholds=[.nan]", "scoring.thresholds.0 must be a finite number"),
    ("sweep={space: {training.lr: {grid: [1e-4]}}, scheduler: {reduction_factor: 1}}",
     "sweep.scheduler.reduction_factor must be > 1, got 1.0"),
])
def test_a_number_out_of_range_names_the_override(tmp_path, override, message):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    with pytest.raises(ConfigError) as err:
        load_recipe(path, [override])
    assert message in str(err.value) and f"override {override!r}" in str(err.value)


def test_a_number_out_of_range_names_the_file_and_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + "evaluation:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:11: evaluation\.batch_size must be ≥ 1, got 0"):
        load_recipe(path)


def test_yaml_1_1_float_spellings_are_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    assert load_recipe(path).training.lr == 1e-4
    assert load_recipe(path, ["training.lr=3E-5", "router.lr=5e-3"]).training.lr == 3e-5


@pytest.mark.parametrize("extra,message", [
    ("  eval:\n    - {name: '../../../x'}\n", "'../../../x' is not a dataset name"),
    ("  eval:\n    - {path: a/test.jsonl}\n    - {path: b/test.jsonl}\n",
     "task.eval.1 and task.eval.0 are both labelled 'test'"),
    ("  eval:\n    - {name: gsm8k, split: test}\n    - {name: gsm8k, split: train}\n",
     "task.eval.1 and task.eval.0 are both labelled 'gsm8k'"),
])
def test_eval_sets_are_filed_under_distinct_safe_labels(tmp_path, extra, message):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.replace("  train: {path: data/train.jsonl}\n", "  train: {path: data/train.jsonl}\n" + extra))
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)


def test_a_hub_id_becomes_one_file_name():
    assert schema.DataSource(name="openslr/librispeech_asr").label == "openslr__librispeech_asr"
    assert schema.DataSource(name="builtin:spoken-tiny").label == "spoken-tiny"
    assert schema.DataSource(path="/data/my set.v2.jsonl").label == "my_set.v2"
    assert schema.DataSource(path="/data/.hidden.jsonl").label == "hidden"


@pytest.mark.parametrize("override,message", [
    ("compare.3.ranks=[1,8]", r"override 'compare\.3\.ranks=\[1,8\]': index 3 is out of range \(the list has 0 items"),
    ("method.ranks.0.x=1", r"override 'method\.ranks\.0\.x=1': method\.ranks\.0 is a value \(2\), not a section"),
    ("method.ranks.5=4", r"index 5 is out of range \(the list has 2 items"),
    ("method.ranks.two=4", r"'two' must be a list index"),
    ("training.lr.x=1", r"training\.lr is a value \(0\.0001\), not a section"),
])
def test_an_override_into_a_list_or_a_value_names_itself(tmp_path, override, message):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + "compare: []\n")
    with pytest.raises(ConfigError, match=message):
        load_recipe(path, [override])


def test_a_recipe_path_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(ConfigError, match="a folder, not a recipe file"):
        load_recipe(tmp_path)
