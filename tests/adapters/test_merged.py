"""Per-class merged inference: the same tokens as the unmerged mixed batch, on the plain base modules,
with the weights put back bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from flexi_workflows.adapters import FlexiLoraConfig, FlexiLoraLinear, inject_flexi_lora
from flexi_workflows.adapters.merged import RankMerger, generate_per_rank, rank_groups
from flexi_workflows.errors import RankError
from tests.conftest import make_tiny_llama, randomize_lora

RANKS = [2, 8, 1, 8, 2, 4]
GEN = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": 0}


def _flexi(dtype=torch.float32, seed: int = 0):
    model = inject_flexi_lora(make_tiny_llama(seed=seed).to(dtype), FlexiLoraConfig(r_max=8, alpha=16)).eval()
    randomize_lora(model, seed=seed)
    return model


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (len(RANKS), 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as the evaluation's tokenizer pads
    mask[3, :2] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_rank_groups_keep_row_order_lowest_rank_first():
    groups = rank_groups(RANKS)
    assert [(r, rows.tolist()) for r, rows in groups] == [(1, [2]), (2, [0, 4]), (4, [5]), (8, [1, 3])]


def test_merged_generation_gives_the_unmerged_tokens_and_restores_the_weights():
    """fp32: the same greedy tokens for every row of a mixed-rank batch, on plain nn.Linear modules whose
    weights are merge_and_unload's at each rank; afterwards the state is bit-identical to before."""
    inputs = _batch()
    for seed in range(3):
        model = _flexi(seed=seed)
        unmerged = model.generate(**inputs, ranks=RANKS, **GEN)
        assert len({tuple(unmerged[b].tolist()) for b in range(len(RANKS))}) > 1
        before = _snapshot(model)
        merged_at = {r: dict(copy.deepcopy(model).merge_and_unload(r).named_parameters()) for r in set(RANKS)}
        seen = []

        def generate(base, group, seen=seen, merged_at=merged_at):
            q = base.model.layers[0].self_attn.q_proj
            assert type(q) is torch.nn.Linear, "a group runs on the bare base modules"
            rank = sorted(set(RANKS))[len(seen)]  # groups come lowest rank first
            assert torch.equal(q.weight, merged_at[rank]["model.layers.0.self_attn.q_proj.weight"])
            seen.append((rank, group["input_ids"].shape[0]))
            return list(base.generate(**group, **GEN))

        got = torch.stack(generate_per_rank(model, RANKS, inputs, generate))
        assert sorted(seen) == [(1, 1), (2, 2), (4, 1), (8, 2)], "one generate call per rank present"
        assert torch.equal(got, unmerged), f"seed {seed}: merged tokens differ from the unmerged path"
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "weights restored bit for bit"
        assert all(isinstance(layer, FlexiLoraLinear) for _, layer in model.flexi_layers())
        again = model.generate(**inputs, ranks=RANKS, **GEN)
        assert torch.equal(again, unmerged), "the adapter works as before"


def test_bf16_weights_come_back_bit_exact_where_subtracting_the_delta_would_not():
    model = _flexi(torch.bfloat16)
    before = _snapshot(model)
    merger = RankMerger(model)
    merger.merge(8)
    merger.merge(2)  # from the copy, not on top of rank 8
    layer = merger.layers["model.layers.0.self_attn.q_proj"]
    weight = model.base_model.model.layers[0].self_attn.q_proj.weight
    delta = layer.delta_weight(2).float()
    original = before["base_model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert torch.equal(weight, (original.float() + delta).to(torch.bfloat16))
    assert not torch.equal((weight.float() - delta).to(torch.bfloat16), original), \
        "unmerging by subtraction would not give the weights back"
    merger.restore()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_weights_are_restored_when_generation_fails():
    model = _flexi()
    before = _snapshot(model)

    def fail(base, group):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        generate_per_rank(model, RANKS, _batch(), fail)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(layer, FlexiLoraLinear) for _, layer in model.flexi_layers())


def test_a_weight_shared_with_another_module_is_refused():
    model = inject_flexi_lora(make_tiny_llama(tie_word_embeddings=True),
                              FlexiLoraConfig(r_max=4, targets=["lm_head"]))
    with pytest.raises(RankError, match="shared with model.embed_tokens.weight"):
        RankMerger(model)
