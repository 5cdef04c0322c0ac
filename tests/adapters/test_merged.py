"""Per-class merged inference: the same tokens as the unmerged mixed batch from one generate call on the
base weights with one rank merged in (the other ranks' rows corrected), with the weights put back bit
for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from flexi_workflows.adapters import FlexiLoraConfig, FlexiLoraLinear, inject_flexi_lora
from flexi_workflows.adapters.merged import (
    RankCorrectedLinear,
    RankMerger,
    generate_merged,
    merge_order,
    rank_groups,
)
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


def test_merge_order_puts_the_most_common_rank_first_and_one_slice_per_other_rank():
    merged, order, slices = merge_order(RANKS)  # ranks 2 and 8 both hold two rows: the lower rank is merged
    assert merged == 2
    assert order.tolist() == [0, 4, 2, 5, 1, 3]
    assert slices == [(1, 2, 3), (4, 3, 4), (8, 4, 6)]
    merged, order, slices = merge_order([8, 2, 8, 8])
    assert (merged, order.tolist(), slices) == (8, [0, 2, 3, 1], [(2, 3, 4)])
    assert merge_order([4, 4])[2] == [], "a single-rank batch needs no correction"


@pytest.mark.parametrize("scaling", ["alpha_over_r", "learned"])
def test_a_corrected_layer_gives_each_slice_its_own_rank(scaling):
    """Rows in a slice at rank r get W + Δ_r (merge_and_unload's weight at r) although rank m is merged; the
    slices scale with generate's repeated rows (k per row) and with (batch, seq) flattened before a linear."""
    model = inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=8, alpha=16, scaling=scaling))
    randomize_lora(model, seed=1)
    if scaling == "learned":
        with torch.no_grad():
            for _, layer in model.flexi_layers():
                layer.lora_gamma.mul_(torch.linspace(0.5, 1.5, 8))
    name = "model.layers.0.self_attn.q_proj"
    at = {r: copy.deepcopy(model).merge_and_unload(r).get_submodule(name) for r in (1, 2, 4, 8)}
    merger = RankMerger(model)
    merger.merge(2)
    merger.correct([(1, 2, 3), (4, 3, 4), (8, 4, 6)], batch_size=6)
    layer = model.base_model.get_submodule(name)
    assert type(layer) is RankCorrectedLinear
    sorted_ranks = [2, 2, 1, 4, 8, 8]
    x = torch.randn(6, 5, layer.in_features)
    for k, inputs in ((1, x), (3, x.repeat_interleave(3, dim=0)), (1, x.reshape(30, -1))):
        y = layer(inputs)
        per = inputs.shape[0] // 6
        for row, rank in enumerate(sorted_ranks):
            rows = slice(row * per, (row + 1) * per)
            torch.testing.assert_close(y[rows], at[rank](inputs[rows]), rtol=1e-5, atol=1e-5,
                                       msg=f"k={k}: row {row} is not at rank {rank}")
    with pytest.raises(RankError, match="given for 6 rows but a layer saw 4"):
        layer(x[:4])
    merger.restore()


def test_merged_generation_gives_the_unmerged_tokens_in_one_call_and_restores_the_weights():
    """fp32: the same greedy tokens for every row of a mixed-rank batch from one generate call, on the base
    weights with the most common rank merged as merge_and_unload merges it; afterwards the state is
    bit-identical to before. A single-rank batch runs on the bare base modules."""
    inputs = _batch()
    for seed in range(3):
        model = _flexi(seed=seed)
        unmerged = model.generate(**inputs, ranks=RANKS, **GEN)
        assert len({tuple(unmerged[b].tolist()) for b in range(len(RANKS))}) > 1
        before = _snapshot(model)
        merged_at = dict(copy.deepcopy(model).merge_and_unload(2).named_parameters())
        seen = []

        def generate(base, batch, seen=seen, merged_at=merged_at):
            q = base.model.layers[0].self_attn.q_proj
            assert type(q) is RankCorrectedLinear, "the other ranks' rows are corrected"
            assert torch.equal(q.weight, merged_at["model.layers.0.self_attn.q_proj.weight"]), "rank 2 is merged"
            seen.append(batch["input_ids"].tolist())
            return list(base.generate(**batch, **GEN))

        got = torch.stack(generate_merged(model, RANKS, inputs, generate))
        assert seen == [inputs["input_ids"][[0, 4, 2, 5, 1, 3]].tolist()], "one generate call, rows sorted by rank"
        assert torch.equal(got, unmerged), f"seed {seed}: merged tokens differ from the unmerged path"
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "weights restored bit for bit"
        assert all(isinstance(layer, FlexiLoraLinear) for _, layer in model.flexi_layers())
        again = model.generate(**inputs, ranks=RANKS, **GEN)
        assert torch.equal(again, unmerged), "the adapter works as before"

    model = _flexi()
    uniform = model.generate(**inputs, ranks=4, **GEN)

    def plain(base, batch):
        assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear, "one rank: the bare base modules"
        return list(base.generate(**batch, **GEN))

    assert torch.equal(torch.stack(generate_merged(model, [4] * len(RANKS), inputs, plain)), uniform)


def test_a_merger_kept_across_batches_merges_into_the_same_buffers():
    """As an evaluation actor keeps one merger: batches whose most common rank differs each get the unmerged
    path's tokens, every merge writes into the same tensor, and the model is whole again after each batch."""
    model = _flexi(seed=1)
    inputs = _batch(seed=1)
    before = _snapshot(model)
    q_weight = model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight
    original_ptr = q_weight.data_ptr()
    merger = RankMerger(model)
    merged = []  # held, so a buffer allocated afresh could not reuse a freed one's address

    def generate(base, batch):
        merged.append(base.model.layers[0].self_attn.q_proj.weight.data)
        return list(base.generate(**batch, **GEN))

    for ranks in (RANKS, [8, 8, 2, 8, 1, 8], [4] * len(RANKS), RANKS):
        unmerged = model.generate(**inputs, ranks=ranks, **GEN)
        got = torch.stack(generate_merged(model, ranks, inputs, generate, merger=merger))
        assert torch.equal(got, unmerged), f"ranks {ranks}: merged tokens differ from the unmerged path"
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "weights restored bit for bit"
    ptrs = {tensor.data_ptr() for tensor in merged}
    assert len(merged) == 4 and len(ptrs) == 1, "every merge writes into one buffer"
    assert original_ptr not in ptrs and q_weight.data_ptr() == original_ptr, "the original is never written"
    with pytest.raises(RankError, match="made for another model"):
        generate_merged(_flexi(), RANKS, inputs, generate, merger=merger)


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
        generate_merged(model, RANKS, _batch(), fail)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(layer, FlexiLoraLinear) for _, layer in model.flexi_layers())


def test_a_weight_shared_with_another_module_is_refused():
    model = inject_flexi_lora(make_tiny_llama(tie_word_embeddings=True),
                              FlexiLoraConfig(r_max=4, targets=["lm_head"]))
    with pytest.raises(RankError, match="shared with model.embed_tokens.weight"):
        RankMerger(model)


def test_merged_beam_search_follows_each_rows_rank():
    """Beam search repeats each row (repeat_interleave): the corrected slices grow with it."""
    inputs, beams = _batch(), {**GEN, "num_beams": 3}
    model = _flexi(seed=1)
    unmerged = model.generate(**inputs, ranks=RANKS, **beams)
    got = torch.stack(generate_merged(model, RANKS, inputs, lambda base, batch: list(base.generate(**batch, **beams))))
    assert torch.equal(got, unmerged)


def test_merged_whisper_gives_the_unmerged_transcripts(tiny_whisper):
    """Encoder self-attention and decoder self- and cross-attention are all corrected per slice: the
    encoder's rows and the decoder's rows both follow the sorted batch."""
    model = inject_flexi_lora(tiny_whisper, FlexiLoraConfig(r_max=8))
    randomize_lora(model, std=0.3)
    torch.manual_seed(1)
    feats, ranks, gen = torch.randn(5, 16, 40), [2, 8, 2, 4, 2], {"max_new_tokens": 5, "do_sample": False}
    unmerged = model.generate(input_features=feats, ranks=ranks, **gen)
    assert len({tuple(row.tolist()) for row in unmerged}) > 1
    got = torch.stack(generate_merged(model, ranks, {"input_features": feats},
                                      lambda base, batch: list(base.generate(**batch, **gen))))
    assert torch.equal(got, unmerged)


def test_the_readme_adapter_lines_run_as_written_and_merged_gives_the_same_tokens():
    """The README's adapter lines run as written; with nonzero adapters (B starts at zero, so every rank is
    the base model at first) its generate lines run again and the merged call gives generate's tokens."""
    import re

    from tests.conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    snippet = re.findall(r"```python\n(.*?)```", readme[readme.index("## The adapter in five lines"):], re.DOTALL)[0]
    ids = torch.randint(3, 96, (4, 6), generator=torch.Generator().manual_seed(0))
    hf_model = make_tiny_llama()
    scope = {"hf_model": hf_model, "ids": ids, "mask": torch.ones_like(ids)}
    exec(compile(snippet, "README.md (The adapter in five lines)", "exec"), scope)  # noqa: S102 — the README is ours
    assert scope["model"].base_model is hf_model and scope["out"].loss is not None
    randomize_lora(scope["model"], seed=3)
    generate_lines = snippet[snippet.index("gen = "):]
    exec(compile(generate_lines, "README.md (The adapter in five lines)", "exec"), scope)  # noqa: S102
    gen = scope["gen"]
    assert len({tuple(row.tolist()) for row in gen}) > 1
    assert torch.equal(torch.stack(scope["fast"]), gen)
