"""Injection into HF models: PEFT equivalence, mixed batches, merge, generate, unload."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from flexi_workflows.adapters import FlexiLoraConfig, FlexiLoraModel, inject_flexi_lora
from tests.conftest import make_tiny_llama, randomize_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _peft_lora(rank: int, alpha: float = 16, rslora: bool = False):
    torch.manual_seed(3)
    peft_model = get_peft_model(
        make_tiny_llama(),
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, use_rslora=rslora, lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                module.lora_B["default"].weight.normal_(0, 0.1)
    return peft_model.eval()


def _flexi_from_peft(peft_model, rank: int, r_max: int = 8, scaling: str = "alpha_over_r") -> FlexiLoraModel:
    """Flexi-LoRA of r_max with PEFT's A, B copied into the first `rank` rows / columns."""
    flexi = inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=r_max, alpha=16, scaling=scaling, targets=TARGETS))
    randomize_lora(flexi, seed=9)  # rows/columns ≥ rank hold junk that must not leak in
    peft_modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in flexi.flexi_layers():
            src = peft_modules[name]
            layer.lora_A[:rank].copy_(src.lora_A["default"].weight)
            layer.lora_B[:, :rank].copy_(src.lora_B["default"].weight)
    return flexi.eval()


@pytest.mark.parametrize("rank,rslora", [(4, False), (2, True), (8, False)])
def test_uniform_rank_equals_peft_lora(rank, rslora):
    peft_model = _peft_lora(rank, rslora=rslora)
    flexi = _flexi_from_peft(peft_model, rank, scaling="alpha_over_sqrt_r" if rslora else "alpha_over_r")
    ids = torch.randint(3, 96, (3, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expect = peft_model(input_ids=ids, attention_mask=mask).logits
        got_fast = flexi(input_ids=ids, attention_mask=mask, ranks=rank).logits
        got_vector = flexi(input_ids=ids, attention_mask=mask, ranks=torch.full((3,), rank)).logits
        base = make_tiny_llama()(input_ids=ids).logits
    assert (expect - base).abs().max() > 1e-3, "the LoRA must change the output"
    torch.testing.assert_close(got_fast, expect, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_vector, expect, atol=1e-5, rtol=0)


def test_merged_rank_equals_merged_peft():
    rank = 4
    peft_model = _peft_lora(rank)
    flexi = _flexi_from_peft(peft_model, rank)
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        expect = peft_model.merge_and_unload()(input_ids=ids).logits
        merged = flexi.merge_and_unload(rank)
        assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)


def test_each_sample_of_a_mixed_batch_equals_itself_alone():
    flexi = inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=8))
    randomize_lora(flexi)
    ids = torch.randint(3, 96, (4, 7))
    ranks = torch.tensor([2, 8, 1, 5])
    with torch.no_grad():
        mixed = flexi(input_ids=ids, ranks=ranks).logits
        for b in range(4):
            alone = flexi(input_ids=ids[b : b + 1], ranks=int(ranks[b])).logits
            torch.testing.assert_close(mixed[b : b + 1], alone, atol=1e-5, rtol=0)
        # and the ranks really differ in effect
        assert (flexi(input_ids=ids[:1], ranks=8).logits - mixed[:1]).abs().max() > 1e-3


def test_gradients_respect_rank_and_base_is_frozen():
    flexi = inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=8))
    randomize_lora(flexi)
    flexi.train()
    ids = torch.randint(3, 96, (2, 6))
    flexi(input_ids=ids, labels=ids, ranks=[2, 3]).loss.backward()
    for _, layer in flexi.flexi_layers():
        assert layer.lora_A.grad[3:].abs().max() == 0
        assert layer.lora_B.grad[:, 3:].abs().max() == 0
        assert layer.lora_B.grad[:, :3].abs().max() > 0
    for name, p in flexi.named_parameters():
        if ".lora_" not in name:
            assert not p.requires_grad and p.grad is None, name
    trainable = {n for n, p in flexi.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)


def test_generate_mixed_batch_equals_each_sample_alone():
    flexi = inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=8))
    randomize_lora(flexi, std=0.3)
    ids = torch.randint(3, 96, (3, 5))
    ranks = torch.tensor([1, 8, 4])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    mixed = flexi.generate(input_ids=ids, attention_mask=torch.ones_like(ids), ranks=ranks, **kw)
    for b in range(3):
        alone = flexi.generate(input_ids=ids[b : b + 1], ranks=int(ranks[b]), **kw)
        assert torch.equal(mixed[b], alone[0])
    rank8 = flexi.generate(input_ids=ids, ranks=8, **kw)
    assert not torch.equal(rank8, mixed), "ranks 1/4 must change some generation"


def test_generate_with_beams_follows_each_input_rank():
    flexi = inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=8))
    randomize_lora(flexi, std=0.3)
    ids = torch.randint(3, 96, (2, 5))
    kw = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    mixed = flexi.generate(input_ids=ids, ranks=[2, 8], **kw)
    assert mixed.shape[0] == 4
    for b, r in enumerate([2, 8]):
        alone = flexi.generate(input_ids=ids[b : b + 1], ranks=r, **kw)
        assert torch.equal(mixed[2 * b : 2 * b + 2], alone)


def test_whisper_default_targets_and_generate(tiny_whisper):
    flexi = inject_flexi_lora(tiny_whisper, FlexiLoraConfig(r_max=4))
    assert flexi.adapter_config.targets == ["q_proj", "k_proj", "v_proj", "out_proj"]
    # encoder self-attn, decoder self-attn and cross-attn: 3 attention blocks × 4 projections
    assert len(flexi.target_names) == 12
    randomize_lora(flexi, std=0.3)
    feats = torch.randn(2, 16, 40)
    out = flexi.generate(input_features=feats, ranks=[1, 4], max_new_tokens=4, do_sample=False)
    for b, r in enumerate([1, 4]):
        alone = flexi.generate(input_features=feats[b : b + 1], ranks=r, max_new_tokens=4, do_sample=False)
        assert torch.equal(out[b], alone[0])


def test_unload_restores_base_outputs():
    base = make_tiny_llama()
    ids = torch.randint(3, 96, (2, 6))
    with torch.no_grad():
        expect = base(input_ids=ids).logits
    flexi = inject_flexi_lora(copy.deepcopy(base), FlexiLoraConfig(r_max=4))
    randomize_lora(flexi)
    restored = flexi.unload()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, expect)


def test_whisper_mixed_rank_batch_equals_each_utterance_alone_in_encoder_and_decoder(tiny_whisper):
    """Per-utterance ranks reach the encoder's self-attention and the decoder's self- and cross-attention:
    a batch of mixed ranks gives each utterance exactly what it gets alone at its rank."""
    flexi = inject_flexi_lora(tiny_whisper, FlexiLoraConfig(r_max=8))
    randomize_lora(flexi, std=0.3)
    torch.manual_seed(1)
    feats = torch.randn(3, 16, 40)
    labels = torch.randint(3, 64, (3, 5))
    ranks = [2, 8, 5]
    with torch.no_grad():
        mixed = flexi(input_features=feats, labels=labels, ranks=ranks)
        for b, r in enumerate(ranks):
            alone = flexi(input_features=feats[b : b + 1], labels=labels[b : b + 1], ranks=r)
            torch.testing.assert_close(mixed.encoder_last_hidden_state[b], alone.encoder_last_hidden_state[0])
            torch.testing.assert_close(mixed.logits[b], alone.logits[0])
        # not vacuous: the rank changes both the encoder's output and the decoder's
        other = flexi(input_features=feats[:1], labels=labels[:1], ranks=8)
    assert not torch.allclose(other.encoder_last_hidden_state[0], mixed.encoder_last_hidden_state[0])
    assert not torch.allclose(other.logits[0], mixed.logits[0])


def test_whisper_beams_carry_their_utterances_rank(tiny_whisper):
    flexi = inject_flexi_lora(tiny_whisper, FlexiLoraConfig(r_max=8))
    randomize_lora(flexi, std=0.5)
    torch.manual_seed(2)
    feats = torch.randn(2, 16, 40)
    kw = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    mixed = flexi.generate(input_features=feats, ranks=[1, 8], **kw)
    for b, r in enumerate([1, 8]):
        alone = flexi.generate(input_features=feats[b : b + 1], ranks=r, **kw)
        assert torch.equal(mixed[2 * b : 2 * b + 2], alone)
        # not vacuous: the other rank gives these beams other tokens
        assert not torch.equal(flexi.generate(input_features=feats[b : b + 1], ranks=9 - r, **kw), alone)
