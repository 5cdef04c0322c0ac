"""Stage fingerprints hold exactly what changes a result.

Walks every recipe field, changes it, and checks the set of stages whose fingerprint moves: none for
the keys declared result-neutral (stages/inputs.py), exactly the stages the key affects otherwise.
Planning reads configs and file digests only, so this runs without Ray.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import typing

import pytest

from flexi_workflows.recipes.schema import Recipe
from flexi_workflows.stages.inputs import RESULT_NEUTRAL
from flexi_workflows.stages.plan import plan_pipeline
from tests.helpers import small_recipe, write_math_set

COMPARE = [{"name": "lora", "rank": 4, "dropout": 0.0}, {"name": "flexi", "ranks": [1, 8], "dropout": 0.0}]
ROUTED = ("method", "compare.1")  # the flexi methods of the recipe above
ALL_METHODS = ("method", "compare.0", "compare.1")


def roles(recipe: Recipe) -> dict[str, str]:
    """Stage fingerprints by role (labels change with ranks; roles do not)."""
    plan = plan_pipeline(recipe)
    out = {"score": plan.score.fingerprint, "route": plan.route.fingerprint, "eval:base": plan.base_eval.fingerprint}
    for key, stages in zip(ALL_METHODS, plan.methods):
        out[f"train:{key}"] = stages.train.fingerprint
        out[f"eval:{key}"] = stages.eval.fingerprint
    return out


def leaves(obj, prefix: str = ""):
    """Every leaf field of the recipe as (dotted key, value, type)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, key + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                yield from leaves(item, f"{key}.{i}.")
        else:
            yield key, value, hints[f.name]


# What this test holds result-neutral, stated here and not read from the code under test: marking a
# result-affecting key neutral in stages/inputs.py (and dropping it from a fingerprint) must fail below.
NEUTRAL = (
    "name", "output_dir", "storage", "model.cache_dir", "task.train.note", "task.eval.*.note",
    "scoring.num_actors", "scoring.cpus_per_actor", "scoring.gpus_per_actor",
    "training.log_every", "training.checkpoint_every", "training.max_failures", "training.gradient_checkpointing",
    "distribution.cpus_per_worker", "distribution.torch_threads",
    # offload moves where optimizer state and parameters live; the torch AdamW computes the same update on
    # the same fp32 values (the losses match bit for bit on CPU, ZeRO 1-3, fp32 and bf16). On GPU the CPU step
    # may round differently in the last bits, as torch_threads may: not a different experiment.
    "distribution.offload_optimizer", "distribution.offload_params",
    "evaluation.include_base", "evaluation.num_actors", "evaluation.cpus_per_actor", "evaluation.gpus_per_actor",
    "tracking.*", "ray.*", "sweep", "sweep.*",
)


# scoring settings that only a sampling score stage (scoring.num_samples > 1) reads
SAMPLING = ("scoring.temperature", "scoring.top_p", "scoring.seed")


def neutral(key: str) -> bool:
    return any(fnmatch.fnmatch(key, pattern) for pattern in NEUTRAL)


def expected(key: str) -> set[str]:
    """The stages a key affects, stated independently of the code under test."""
    if neutral(key):
        return set()
    trains = {f"train:{m}" for m in ALL_METHODS}
    method_evals = {f"eval:{m}" for m in ALL_METHODS}
    routed = {f"{kind}:{m}" for kind in ("train", "eval") for m in ROUTED}
    everything = {"score", "route", "eval:base"} | trains | method_evals
    top = key.split(".")[0]
    # task custom's prompt and metric settings: every prompt, every grade (score → route → routed methods,
    # and every evaluation); a method without a router trains on the same prompts, so it retrains too
    if top == "model" or key in ("task.name", "task.max_prompt_tokens", "task.date_string", "task.system_prompt",
                                 "task.chat_template", "task.metric"):
        return everything
    if key == "task.max_target_tokens":
        return trains | method_evals
    if key.startswith("task.train."):
        return {"score", "route"} | trains | method_evals
    if key.startswith("task.eval."):
        return {"eval:base"} | method_evals
    if key == "seed":
        return {"route"} | trains | method_evals
    if key in SAMPLING:
        return set()  # the base recipe scores one greedy answer; see test_sampling_settings_count_when_sampling
    if key == "evaluation.merged":
        return set()  # neutral over fp32 weights (the base recipe's); see test_merged_evaluation_counts_in_16_bit
    if top == "scoring":
        return {"score", "route"} | routed
    if top == "router":
        return {"route"} | routed
    if top == "method":
        return {"train:method", "eval:method"}
    if top == "compare":
        index = key.split(".")[1]
        return {f"train:compare.{index}", f"eval:compare.{index}"}
    if top in ("training", "distribution"):
        return trains | method_evals
    if top == "evaluation":
        return {"eval:base"} | method_evals
    raise AssertionError(f"no expectation for {key}")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("fingerprints")
    other_data = write_math_set(tmp / "other.jsonl", 20, marked=False)
    other_model = tmp / "other-model"
    import shutil

    shutil.copytree(tiny_model_dir, other_model)
    config = json.loads((other_model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (other_model / "config.json").write_text(json.dumps(config))
    return tmp, other_data, other_model


def perturbations(key: str, value, tp, world) -> list[str]:
    """Overrides that change `key` to another valid value (with the companions a cross-field rule needs)."""
    tmp, other_data, other_model = world
    ds_file = tmp / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000000}}))
    special = {
        "model.name_or_path": [f"model.name_or_path={other_model}"],
        "model.cache_dir": ["model.cache_dir=/elsewhere"],
        "task.name": ["task.name=arith"],
        "task.date_string": ["task.date_string=1 Jan 2030"],
        "task.train.path": [f"task.train.path={other_data}"],
        "task.eval.0.path": [f"task.eval.0.path={other_data}"],
        "task.train.subsets": ["task.train.subsets=[train]"],
        "task.eval.0.subsets": ["task.eval.0.subsets=[mini]"],
        "scoring.num_classes": ["scoring.num_classes=3", "scoring.thresholds=[0.8, 0.3]", "scoring.class_names=[a, b, c]",
                                "method.ranks=[1, 4, 8]", "compare.1.ranks=[1, 2, 8]", "scoring.num_samples=4"],
        "scoring.thresholds": ["scoring.thresholds=[0.4]"],
        "scoring.class_names": ["scoring.class_names=[simple, tricky]"],
        "method.name": ["method={name: dylora, r_min: 2, r_max: 8}"],
        "compare.0.name": ["compare.0={name: lora, rank: 8}"],
        "compare.1.name": ["compare.1={name: dylora_plus, r_min: 1, r_max: 8}"],
        "method.ranks": ["method.ranks=[2, 16]"],
        "compare.1.ranks": ["compare.1.ranks=[4, 8]"],
        "method.targets": ["method.targets=[q_proj]"],
        "compare.0.targets": ["compare.0.targets=[q_proj]"],
        "compare.1.targets": ["compare.1.targets=[q_proj]"],
        "method.dropout": ["method.dropout=0.3"],
        "compare.0.dropout": ["compare.0.dropout=0.3"],
        "compare.1.dropout": ["compare.1.dropout=0.3"],
        "router.holdout": ["router.holdout=0.3"],
        "training.warmup_ratio": ["training.warmup_ratio=0.2"],
        "training.resume": [f"training.resume={tmp}"],
        "distribution.precision": ["distribution.precision=bf16"],
        "distribution.zero_stage": ["distribution.zero_stage=3"],
        "distribution.offload_optimizer": ["distribution.offload_optimizer=cpu"],
        "distribution.offload_params": ["distribution.offload_params=cpu"],  # over BASELINES' ZeRO-3
        # result-changing: the file's content is fingerprinted (a DeepSpeed key the recipe does not set)
        "distribution.deepspeed_config": [f"distribution.deepspeed_config={ds_file}"],
        "tracking.tracking_uri": ["tracking.tracking_uri=sqlite:///elsewhere.db"],
        "tracking.register_as": ["tracking.register_as=my-adapter"],  # neutral (tracking.*): MLflow records only
        "ray.address": ["ray.address=auto"],
        "sweep": ["sweep={space: {seed: [0, 1]}, metric: accuracy_all}"],
        # task custom's keys (the recipe compared is a custom one, BASELINES): planning reads no rows
        "task.train.columns": ["task.train.columns={prompt: question, completion: answer}"],
        "task.eval.0.columns": ["task.eval.0.columns={prompt: question, completion: answer}"],
        "task.system_prompt": ["task.system_prompt=Be brief."],
        "task.chat_template": ["task.chat_template='{{ messages[-1].content }}'"],
        "task.metric": ["task.metric=f1"],
    }
    if key in special:
        return special[key]
    if typing.get_origin(tp) is typing.Literal:
        return [f"{key}={next(c for c in typing.get_args(tp) if c != value)}"]
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    kind = args[0]
    if kind is bool:
        return [f"{key}={str(not value).lower()}"]
    if kind is int:
        return [f"{key}={(value or 1) + 1}"]
    if kind is float:
        return [f"{key}={(value or 0.1) * 0.5}"]
    if kind is str:
        return [f"{key}=other"]
    raise AssertionError(f"no perturbation for {key} ({tp})")


# keys whose other value is valid only with a companion setting, present in both recipes compared
BASELINES = {"distribution.offload_params": ["distribution.zero_stage=3"],
             **{f"task.{k}": ["task.name=custom"]
                for k in ("train.columns", "eval.0.columns", "system_prompt", "chat_template", "metric")},
             # result-changing: the val_loss curve is recorded, and `best` picks which step's weights are kept
             "training.eval_every": ["training.validation_rows=8"],
             "training.final_artifact": ["training.validation_rows=8"]}


def test_every_recipe_field_is_fingerprinted_where_it_matters_or_declared_neutral(tmp_path, tiny_model_dir, world):
    base = small_recipe(tmp_path, tiny_model_dir, compare=COMPARE)
    plain = roles(base)
    walked = []
    for key, value, tp in leaves(base):
        companions = BASELINES.get(key, [])
        before = roles(small_recipe(tmp_path, tiny_model_dir, overrides=["compare=" + json.dumps(COMPARE)] + companions)) \
            if companions else plain
        overrides = ["compare=" + json.dumps(COMPARE)] + companions + perturbations(key, value, tp, world)
        changed = small_recipe(tmp_path, tiny_model_dir, overrides=overrides)
        after = roles(changed)
        moved = {role for role in before if before[role] != after[role]}
        assert moved == expected(key), f"{key}: changing it moved {sorted(moved)}, expected {sorted(expected(key))}"
        walked.append(key)
    assert {"task.max_prompt_tokens", "scoring.num_actors", "evaluation.num_actors", "training.log_every",
            "distribution.cpus_per_worker", "distribution.torch_threads", "compare.1.ranks", "task.train.columns",
            "task.metric", "task.chat_template", "training.eval_every", "training.final_artifact",
            "tracking.register_as", "tracking.system_metrics_interval"} <= set(walked)
    assert len(walked) > 60


def test_sampling_settings_count_when_sampling(tmp_path, tiny_model_dir):
    sampled = ["compare=" + json.dumps(COMPARE), "scoring.num_samples=4"]
    before = roles(small_recipe(tmp_path, tiny_model_dir, overrides=sampled))
    routed = {f"{kind}:{m}" for kind in ("train", "eval") for m in ROUTED}
    for change in ("scoring.temperature=1.0", "scoring.top_p=0.5", "scoring.seed=7"):
        after = roles(small_recipe(tmp_path, tiny_model_dir, overrides=sampled + [change]))
        assert {r for r in before if before[r] != after[r]} == {"score", "route"} | routed, change


def test_merged_evaluation_counts_in_16_bit(tmp_path, tiny_model_dir):
    """evaluation.merged gives the unmerged tokens over fp32 weights (tests/adapters/test_merged.py), so it is
    neutral there; a 16-bit merged weight is rounded once more and flips near-tie tokens, so it moves the
    evaluations of the nested-adapter methods, and never the base model's."""
    compare = ["compare=" + json.dumps(COMPARE + [{"name": "full"}])]
    for dtype, moves in (("float32", set()), ("bfloat16", {f"eval:{m}" for m in ALL_METHODS})):
        before = roles(small_recipe(tmp_path, tiny_model_dir, overrides=compare + [f"model.dtype={dtype}"]))
        after = roles(small_recipe(tmp_path, tiny_model_dir,
                                   overrides=compare + [f"model.dtype={dtype}", "evaluation.merged=true"]))
        assert {r for r in before if before[r] != after[r]} == moves, dtype
    full = plan_pipeline(small_recipe(tmp_path, tiny_model_dir, overrides=compare + ["model.dtype=bfloat16"]))
    merged = plan_pipeline(small_recipe(tmp_path, tiny_model_dir,
                                        overrides=compare + ["model.dtype=bfloat16", "evaluation.merged=true"]))
    assert full.methods[-1].eval.fingerprint == merged.methods[-1].eval.fingerprint, "full fine-tuning has no ranks"


def test_the_code_declares_exactly_these_keys_neutral():
    assert set(RESULT_NEUTRAL) == set(NEUTRAL)


def test_neutral_declarations_name_real_keys(tmp_path, tiny_model_dir):
    keys = {key for key, _, _ in leaves(small_recipe(tmp_path, tiny_model_dir))}
    for pattern in RESULT_NEUTRAL:
        if pattern == "sweep.*":
            continue  # the sweep section is unset in a plain recipe
        assert any(fnmatch.fnmatch(k, pattern) for k in keys), f"RESULT_NEUTRAL names {pattern!r}, which no recipe key matches"


def test_rank_pairs_share_one_router(tmp_path, tiny_model_dir):
    plan = plan_pipeline(small_recipe(tmp_path, tiny_model_dir, compare=COMPARE))
    flexi_28, flexi_18 = plan.methods[0].train, plan.methods[2].train
    assert flexi_28.label == "flexi-2-8" and flexi_18.label == "flexi-1-8"
    assert flexi_28.upstream == flexi_18.upstream == [plan.route]
    assert plan.methods[1].train.upstream == [], "LoRA needs no router"
    assert len({s.folder for s in plan.stages()}) == len(plan.stages()), "no two stages share a folder"


def test_dylora_evaluated_at_two_ranks_shares_one_training(tmp_path, tiny_model_dir):
    plan = plan_pipeline(small_recipe(tmp_path, tiny_model_dir, method={"name": "dylora", "r_min": 1, "r_max": 8},
                                      compare=[{"name": "dylora", "r_min": 1, "r_max": 8, "eval_rank": 4, "dropout": 0.0}]))
    at8, at4 = plan.methods
    assert (at8.label, at4.label) == ("dylora-1-8", "dylora-1-8-at4")
    assert at8.train.folder == at4.train.folder, "eval_rank changes evaluation only"
    assert at8.eval.folder != at4.eval.folder


def test_a_resume_checkpoint_is_fingerprinted_by_content(tmp_path, tiny_model_dir):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.bin").write_bytes(b"one")
    first = plan_pipeline(small_recipe(tmp_path, tiny_model_dir, training={"resume": str(ckpt)})).methods[0].train.fingerprint
    (ckpt / "state.bin").write_bytes(b"two")
    second = plan_pipeline(small_recipe(tmp_path, tiny_model_dir, training={"resume": str(ckpt)})).methods[0].train
    assert first != second.fingerprint
