"""Bad input gets a clear FlexiError naming what is wrong, never a torch stack trace."""

from __future__ import annotations

import pytest
import torch

from flexi_workflows.adapters import FlexiLoraConfig, inject_flexi_lora
from flexi_workflows.errors import ConfigError, RankError, TargetModuleError
from tests.conftest import make_tiny_llama


@pytest.fixture
def flexi():
    return inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=8))


@pytest.mark.parametrize(
    "ranks,message",
    [
        ([0, 2], r"rank 0 is out of range.*\[1, 8\]"),
        ([2, -1], r"rank -1 is out of range"),
        ([2, 9], r"rank 9 is out of range.*\[1, 8\]"),
        (9, r"rank 9 is out of range"),
        ([2, 2, 2], r"shape \(batch,\) = \(2,\), got \(3,\)"),
        ([[2, 2]], r"shape \(batch,\)"),
        ([2.0, 8.0], r"must be integers"),
    ],
)
def test_bad_rank_vectors(flexi, ranks, message):
    ids = torch.randint(3, 96, (2, 5))
    with pytest.raises(RankError, match=message):
        flexi(input_ids=ids, ranks=ranks)
    with pytest.raises(RankError, match=message):
        flexi.generate(input_ids=ids, ranks=ranks, max_new_tokens=2)


def test_targets_that_match_nothing_list_existing_names():
    with pytest.raises(TargetModuleError) as info:
        inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(targets=["q_proj", "out_proj"]))
    msg = str(info.value)
    assert "['out_proj']" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg


def test_inner_model_called_without_wrapper_explains_itself(flexi):
    with pytest.raises(RankError, match="FlexiLoraModel wrapper"):
        flexi.base_model(input_ids=torch.randint(3, 96, (1, 4)))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"r_max": 0}, "adapter.r_max"),
        ({"alpha": -1}, "adapter.alpha"),
        ({"scaling": "alpha"}, "adapter.scaling"),
        ({"dropout": 1.5}, "adapter.dropout"),
        ({"targets": []}, "adapter.targets"),
    ],
)
def test_bad_adapter_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FlexiLoraConfig(**kwargs)


def test_unknown_config_keys_are_named():
    with pytest.raises(ConfigError, match="unknown keys \\['rmax'\\]"):
        FlexiLoraConfig.from_dict({"rmax": 8})


def test_merge_rank_out_of_range(flexi):
    with pytest.raises(RankError, match="merge rank"):
        flexi.merge_and_unload(9)
