"""Rank policies: static, DyLoRA, DyLoRA+, Flexi."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexi_workflows.adapters import DyLoRA, DyLoRAPlus, FlexiLoraConfig, FlexiRouted, StaticRank, inject_flexi_lora
from flexi_workflows.adapters.policies import eval_stream, policy_from_dict, step_rank
from flexi_workflows.errors import ConfigError, RankError
from tests.conftest import make_tiny_llama


def _draws(policy, training, n=400):
    """n batches; in training each is its own optimizer step (the loop calls set_step before each)."""
    out = []
    for step in range(n):
        policy.set_step(step)
        out.append(policy.ranks(4, training=training))
    return out


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


def test_one_training_rank_per_optimizer_step_whatever_the_worker_or_micro_batch():
    """The rank is a pure function of (seed, step): two workers' policies, several micro-batches each,
    agree at every step without talking to each other; a restarted policy picks up where it left off."""
    workers = [DyLoRA(1, 8, seed=3), DyLoRA(1, 8, seed=3)]
    per_step = []
    for step in range(40):
        seen = set()
        for policy in workers:
            for _micro in range(3):
                policy.set_step(step)
                seen |= set(policy.ranks(2, training=True).tolist())
        assert len(seen) == 1, f"step {step}: ranks {seen}"
        per_step.append(seen.pop())
    assert per_step == [step_rank(3, s, 1, 8) for s in range(40)]
    assert len(set(per_step)) > 4, "the draws cover the range"
    resumed = DyLoRAPlus(1, 8, seed=3)
    resumed.set_step(17)
    assert int(resumed.ranks(1, training=True)[0]) == per_step[17], "DyLoRA and DyLoRA+ draw the same training ranks"
    assert [step_rank(4, s, 1, 8) for s in range(40)] != per_step


def test_a_training_forward_without_a_step_is_an_error():
    with pytest.raises(RankError, match="one rank per optimizer step"):
        DyLoRA(1, 8).ranks(2, training=True)
    assert DyLoRA(1, 8, eval_rank=4).ranks(2, training=False).tolist() == [4, 4]


def test_dylora_plus_eval_streams_differ_per_stream_and_repeat_per_seed():
    a0, a1 = eval_stream(7, 0, 200, 1, 8), eval_stream(7, 1, 200, 1, 8)
    assert not np.array_equal(a0, a1), "each actor's shard has its own stream"
    assert np.array_equal(a0, eval_stream(7, 0, 200, 1, 8)), "the same seed repeats it"
    assert not np.array_equal(a0, eval_stream(8, 0, 200, 1, 8))
    assert np.array_equal(eval_stream(7, 1, 20, 1, 8), a1[:20]), "a longer draw extends a shorter one"
    assert set(a0.tolist()) == set(range(1, 9))
    policy = DyLoRAPlus(1, 8, seed=7)
    for stream, drawn in ((0, a0), (1, a1)):  # any order of positions gives the stream's ranks
        assert [policy.eval_rank(stream, p) for p in (150, 3, 0, 199)] == [int(drawn[p]) for p in (150, 3, 0, 199)]
    training = [step_rank(7, s, 1, 8) for s in range(200)]
    assert training != a0.tolist(), "training draws and eval streams are independent"


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
    for step in range(20):
        flexi.set_step(step)
        flexi(input_ids=ids)
        flexi(input_ids=ids)  # a second micro-batch of the same step
    assert seen[0] == (False, [8, 8], 8)
    train = seen[1:]
    assert all(train[2 * i] == train[2 * i + 1] for i in range(20)), "one rank per step"
    assert len({u for _, _, u in train}) > 1
    assert flexi.last_ranks.tolist() == train[-1][1]


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
