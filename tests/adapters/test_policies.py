"""Rank policies: static, DyLoRA, DyLoRA+, Flexi."""

from __future__ import annotations

import pytest
import torch

from flexi_workflows.adapters import DyLoRA, DyLoRAPlus, FlexiLoraConfig, FlexiRouted, StaticRank, inject_flexi_lora
from flexi_workflows.adapters.policies import policy_from_dict
from flexi_workflows.errors import ConfigError, RankError
from tests.conftest import make_tiny_llama


def _draws(policy, training, n=400):
    return [policy.ranks(4, training=training) for _ in range(n)]


def test_static_rank_everywhere():
    p = StaticRank(3)
    for training in (True, False):
        assert p.ranks(5, training=training).tolist() == [3] * 5


def test_dylora_trains_on_the_whole_range_shared_by_the_batch_and_evaluates_fixed():
    p = DyLoRA(r_min=2, r_max=6, eval_rank=4, seed=0)
    draws = _draws(p, training=True)
    assert all(len(set(d.tolist())) == 1 for d in draws), "one rank per batch"
    seen = {int(d[0]) for d in draws}
    assert seen == {2, 3, 4, 5, 6}
    evals = {int(r) for d in _draws(p, training=False, n=50) for r in d}
    assert evals == {4}


def test_dylora_plus_draws_in_training_and_inference():
    p = DyLoRAPlus(r_min=1, r_max=8, seed=1)
    for training in (True, False):
        draws = _draws(p, training=training)
        assert all(len(set(d.tolist())) == 1 for d in draws)
        assert {int(d[0]) for d in draws} == set(range(1, 9))


def test_random_policies_are_reproducible_under_a_seed():
    a = [int(d[0]) for d in _draws(DyLoRAPlus(1, 8, seed=5), True, 30)]
    b = [int(d[0]) for d in _draws(DyLoRAPlus(1, 8, seed=5), True, 30)]
    c = [int(d[0]) for d in _draws(DyLoRAPlus(1, 8, seed=6), True, 30)]
    assert a == b and a != c


def test_policy_drives_the_model_by_mode():
    flexi = inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=8), DyLoRA(1, 8, eval_rank=8, seed=0))
    seen = []
    orig = flexi.rank_state.using

    def spy(ranks, uniform, expandable=False):
        seen.append((flexi.training, ranks.tolist(), uniform))
        return orig(ranks, uniform, expandable)

    flexi.rank_state.using = spy
    ids = torch.randint(3, 96, (2, 4))
    flexi.eval()
    flexi(input_ids=ids)
    flexi.train()
    for _ in range(20):
        flexi(input_ids=ids)
    assert seen[0] == (False, [8, 8], 8)
    assert len({u for _, _, u in seen[1:]}) > 1


def test_flexi_policy_needs_ranks_or_a_router():
    flexi = inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=8), FlexiRouted())
    ids = torch.randint(3, 96, (2, 4))
    with pytest.raises(RankError, match="needs per-sample ranks"):
        flexi(input_ids=ids)
    flexi(input_ids=ids, ranks=[2, 8])
    routed = inject_flexi_lora(
        make_tiny_llama(), FlexiLoraConfig(r_max=8), FlexiRouted(lambda ids, mask: torch.where(ids[:, 0] > 50, 8, 2))
    )
    assert routed.resolve_ranks(None, 2, torch.tensor([[10, 1], [90, 1]]), None)[0].tolist() == [2, 8]


def test_policies_round_trip_through_dicts_and_validate():
    for p in (StaticRank(4), DyLoRA(1, 8, eval_rank=4, seed=2), DyLoRAPlus(2, 8, seed=3)):
        again = policy_from_dict(p.to_dict())
        assert again.to_dict() == p.to_dict()
    with pytest.raises(ConfigError, match="unknown rank policy"):
        policy_from_dict({"name": "nope"})
    with pytest.raises(RankError, match="r_min <= r_max"):
        inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=4), DyLoRAPlus(1, 8))
    with pytest.raises(RankError):
        inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=4), StaticRank(5))
