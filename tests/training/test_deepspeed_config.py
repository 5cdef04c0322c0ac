"""distribution.deepspeed_config, offload and precision keys: merged, refused or passed on before Ray starts."""

from __future__ import annotations

import json

import pytest

from flexi_workflows.errors import ConfigError
from flexi_workflows.stages.plan import plan_pipeline
from flexi_workflows.training.engines import deepspeed_config_for
from tests.helpers import small_recipe


def _recipe(tmp_path, tiny_model_dir, file_content=None, **distribution):
    if file_content is not None:
        path = tmp_path / "ds.json"
        path.write_text(file_content if isinstance(file_content, str) else json.dumps(file_content))
        distribution["deepspeed_config"] = str(path)
    return small_recipe(tmp_path, tiny_model_dir, distribution=distribution)


def test_recipe_values_map_into_the_deepspeed_config(tmp_path, tiny_model_dir):
    cfg = deepspeed_config_for(_recipe(tmp_path, tiny_model_dir, num_workers=2, zero_stage=3,
                                       offload_optimizer="cpu", offload_params="cpu"))
    assert cfg["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                        "offload_param": {"device": "cpu"}}
    assert cfg["train_batch_size"] == 4 * 1 * 2 and cfg["bf16"] == {"enabled": False}
    # a torch AdamW under ZeRO-Offload: DeepSpeed must not insist on its CPU Adam (a C++ op built at first use)
    assert cfg["zero_force_ds_cpu_optimizer"] is False


def test_file_keys_pass_through_and_matching_or_auto_values_merge(tmp_path, tiny_model_dir):
    cfg = deepspeed_config_for(_recipe(tmp_path, tiny_model_dir, {
        "communication_data_type": "fp32", "wall_clock_breakdown": True,
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 1234, "offload_optimizer": {"pin_memory": True}},
        "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0,
    }, zero_stage=3))
    assert cfg["communication_data_type"] == "fp32" and cfg["wall_clock_breakdown"] is True
    assert cfg["zero_optimization"]["stage3_prefetch_bucket_size"] == 1234
    assert cfg["zero_optimization"]["offload_optimizer"] == {"pin_memory": True, "device": "none"}
    assert cfg["train_micro_batch_size_per_gpu"] == 4  # "auto" takes the recipe's value


def test_the_reduce_bucket_is_the_trainable_count_unless_the_file_sets_it(tmp_path, tiny_model_dir):
    from flexi_workflows.training.engines import (
        DEEPSPEED_REDUCE_BUCKET,
        reduce_bucket_elements,
        with_reduce_bucket,
    )

    own = deepspeed_config_for(_recipe(tmp_path, tiny_model_dir, zero_stage=2))
    assert "reduce_bucket_size" not in own["zero_optimization"]  # the worker sizes it, knowing what it trains
    assert reduce_bucket_elements(own, 1_703_936) == 1_703_936
    assert reduce_bucket_elements(own, 10**10) == DEEPSPEED_REDUCE_BUCKET  # full fine-tuning: DeepSpeed's default
    sized = with_reduce_bucket(own, 4096)
    assert sized["zero_optimization"]["reduce_bucket_size"] == 4096 and "reduce_bucket_size" not in own["zero_optimization"]
    zero0 = deepspeed_config_for(_recipe(tmp_path, tiny_model_dir, zero_stage=0, precision="fp32"))
    assert reduce_bucket_elements(zero0, 4096) is None and with_reduce_bucket(zero0, 4096) == zero0  # no ZeRO bucket
    # a file's own value wins; "auto" (the HF Trainer's spelling) leaves it to the worker
    fixed = deepspeed_config_for(_recipe(tmp_path, tiny_model_dir, {"zero_optimization": {"reduce_bucket_size": 12345}}))
    assert reduce_bucket_elements(fixed, 4096) == 12345 and with_reduce_bucket(fixed, 4096) == fixed
    auto = deepspeed_config_for(_recipe(tmp_path, tiny_model_dir, {"zero_optimization": {"reduce_bucket_size": "auto"}}))
    assert "reduce_bucket_size" not in auto["zero_optimization"] and reduce_bucket_elements(auto, 4096) == 4096


@pytest.mark.parametrize("content,expect", [
    ({"zero_optimization": {"stage": 3}}, ["zero_optimization.stage", "3", "2", "distribution.zero_stage"]),
    ({"bf16": {"enabled": True}}, ["bf16.enabled", "True", "False", "distribution.precision"]),
    ({"fp16": {"enabled": True}}, ["fp16.enabled", "no fp16"]),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, ["offload_optimizer.device", "distribution.offload_optimizer"]),
    ({"train_batch_size": 64}, ["train_batch_size", "64", "4"]),
    ({"optimizer": {"type": "Adam"}}, ["optimizer", "training.lr"]),
    ({"stage3_prefetch_bucket_size": "auto"}, ["stage3_prefetch_bucket_size", "auto"]),
    ("{not json", ["not valid JSON", "line 1"]),
    ("[1, 2]", ["JSON object"]),
])
def test_a_conflicting_or_invalid_file_is_refused_naming_file_key_and_values(tmp_path, tiny_model_dir, content, expect):
    recipe = _recipe(tmp_path, tiny_model_dir, content)
    with pytest.raises(ConfigError) as err:
        plan_pipeline(recipe).methods[0].train.check()  # the stage check, before Ray starts anything
    message = str(err.value)
    assert "ds.json" in message and all(part in message for part in expect), message


def test_a_missing_file_is_refused_naming_it(tmp_path, tiny_model_dir):
    recipe = small_recipe(tmp_path, tiny_model_dir, distribution={"deepspeed_config": str(tmp_path / "nope.json")})
    with pytest.raises(ConfigError, match="nope.json is not a file"):
        plan_pipeline(recipe).methods[0].train.check()


def test_the_train_fingerprint_follows_the_file_content_not_its_path(tmp_path, tiny_model_dir):
    def fingerprint(name, content):
        path = tmp_path / name
        path.write_text(json.dumps(content))
        recipe = small_recipe(tmp_path, tiny_model_dir, distribution={"deepspeed_config": str(path)})
        return plan_pipeline(recipe).methods[0].train.fingerprint

    a = fingerprint("a.json", {"communication_data_type": "fp32"})
    assert fingerprint("b.json", {"communication_data_type": "fp32"}) == a
    assert fingerprint("c.json", {"communication_data_type": "bf16"}) != a


@pytest.mark.parametrize("distribution,expect", [
    ({"zero_stage": 2, "offload_params": "cpu"}, "offload_params=cpu needs distribution.zero_stage=3"),
    ({"zero_stage": 0, "offload_optimizer": "cpu"}, "offload_optimizer=cpu needs distribution.zero_stage"),
    ({"strategy": "ddp", "offload_optimizer": "cpu"}, "offload_optimizer=cpu is a DeepSpeed setting"),
    ({"strategy": "ddp", "deepspeed_config": "x.json"}, "deepspeed_config=x.json is a DeepSpeed setting"),
    ({"offload_optimizer": "nvme"}, "offload_optimizer"),
    # precision: DeepSpeed's bf16 without ZeRO does not train as bf16 does elsewhere (test_precision.py)
    ({"zero_stage": 0, "precision": "bf16"}, "zero_stage=0 with precision=bf16"),
    ({"zero_stage": 0, "gpus_per_worker": 1}, "zero_stage=0 with precision=auto (bf16 on GPU)"),
])
def test_invalid_distribution_settings_are_refused_at_recipe_load(tmp_path, tiny_model_dir, distribution, expect):
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        small_recipe(tmp_path, tiny_model_dir, distribution=distribution)


@pytest.mark.parametrize("distribution,bf16", [
    ({"strategy": "deepspeed", "zero_stage": 2, "precision": "bf16"}, True),
    ({"strategy": "deepspeed", "zero_stage": 0, "precision": "fp32", "gpus_per_worker": 1}, False),
    ({"strategy": "deepspeed", "zero_stage": 3, "gpus_per_worker": 1}, True),  # auto: bf16 on GPU
    ({"strategy": "ddp", "zero_stage": 0, "precision": "bf16"}, True),  # DDP: autocast, any stage key ignored
    ({"strategy": "ddp"}, False),  # auto on CPU: fp32
])
def test_accepted_precision_settings_resolve_as_documented(tmp_path, tiny_model_dir, distribution, bf16):
    assert small_recipe(tmp_path, tiny_model_dir, distribution=distribution).distribution.bf16 is bf16
