"""The router: masked pooling, learning a separable labelling, noise, save/load, dims checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flexi_workflows.errors import ConfigError
from flexi_workflows.models.loading import load_config, load_tokenizer
from flexi_workflows.recipes.schema import RouterConfig
from flexi_workflows.router import RankAssigner, RouterSpec, load_router, masked_mean_pool, save_router
from flexi_workflows.router.pooling import load_input_embeddings, pool_texts
from flexi_workflows.router.train import train_router
from tests.conftest import tiny_llama_config


def test_masked_mean_pool_ignores_padding_on_either_side():
    emb = torch.randn(1, 3, 4)
    left = torch.cat([torch.randn(1, 2, 4), emb], dim=1)
    right = torch.cat([emb, torch.randn(1, 2, 4)], dim=1)
    expect = emb.mean(1)
    torch.testing.assert_close(masked_mean_pool(left, torch.tensor([[0, 0, 1, 1, 1]])), expect)
    torch.testing.assert_close(masked_mean_pool(right, torch.tensor([[1, 1, 1, 0, 0]])), expect)


def test_rank_assigner():
    assign = RankAssigner([2, 8])
    assert assign(torch.tensor([0, 1, 1, 0])).tolist() == [2, 8, 8, 2]
    assert assign.from_logits(torch.tensor([[3.0, 1.0], [0.0, 2.0]])).tolist() == [2, 8]
    with pytest.raises(ConfigError):
        assign(torch.tensor([2]))


def _separable(tiny_model_dir, n=120, seed=0):
    """Easy questions mention apples, hard ones zebras: separable by input tokens alone."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        hard = i % 2
        a, b = rng.integers(0, 12, size=2)
        word = "zebra zebra" if hard else "apple apple"
        texts.append(f"Question: The {word} has {a} plus {b}?")
        labels.append(hard)
    tok = load_tokenizer(tiny_model_dir, padding_side="right")
    emb = load_input_embeddings(tiny_model_dir)
    return pool_texts(texts, tok, emb, max_length=64), np.array(labels), emb


def _spec(emb, noise_std=0.0, **kw):
    return RouterSpec(embed_dim=emb.weight.shape[1], vocab_size=emb.weight.shape[0], class_names=["easy", "hard"],
                      noise_std=noise_std, **kw)


@pytest.mark.parametrize("classifier,noise_on", [("linear", "logits"), ("mlp", "pooled")])
def test_router_learns_a_separable_labelling(tiny_model_dir, classifier, noise_on):
    features, labels, emb = _separable(tiny_model_dir)
    cfg = RouterConfig(classifier=classifier, noise_std=0.1, noise_on=noise_on, epochs=40, holdout=0.25)
    router, report = train_router(features, labels, _spec(emb, 0.1, classifier=classifier, noise_on=noise_on), cfg, seed=0)
    hold = report["holdout"]
    assert hold["size"] == 30
    assert hold["accuracy"] >= 0.9
    assert np.array(hold["confusion_matrix"]).sum() == 30
    assert set(hold["per_class_recall"]) == {"easy", "hard"}


def test_noise_changes_training_and_zero_noise_is_deterministic(tiny_model_dir):
    features, labels, emb = _separable(tiny_model_dir, n=60)
    cfg = RouterConfig(epochs=5)

    def weights(noise_std, seed=0):
        router, _ = train_router(features, labels, _spec(emb, noise_std), cfg, seed=seed)
        return torch.cat([p.detach().flatten() for p in router.classifier.parameters()])

    assert torch.equal(weights(0.0), weights(0.0))
    assert not torch.allclose(weights(0.5), weights(0.0))
    assert torch.equal(weights(0.5), weights(0.5)), "noise is seeded too"
    # noise only in training: the same router gives the same logits in eval mode
    router, _ = train_router(features, labels, _spec(emb, 1.0), cfg, seed=0)
    assert torch.equal(router(features[:4]), router(features[:4]))
    router.train()
    assert not torch.equal(router(features[:4]), router(features[:4]))


def test_additive_and_multiplicative_noise_forms():
    spec_m = RouterSpec(embed_dim=4, vocab_size=10, class_names=["a", "b"], noise_std=0.5)
    from flexi_workflows.router import RankRouter

    router = RankRouter(spec_m)
    router.noise_generator = torch.Generator().manual_seed(0)
    x = torch.zeros(3, 2)
    assert torch.equal(router._noise(x), x), "multiplicative noise keeps zeros at zero"
    spec_a = RouterSpec(embed_dim=4, vocab_size=10, class_names=["a", "b"], noise_std=0.5,
                        noise_type="additive")
    router_a = RankRouter(spec_a)
    assert not torch.equal(router_a._noise(x), x)


def test_save_load_round_trip_and_routing(tiny_model_dir, tmp_path):
    features, labels, emb = _separable(tiny_model_dir, n=60)
    router, _ = train_router(features, labels, _spec(emb), RouterConfig(epochs=20), seed=0)
    save_router(router, tmp_path / "r")
    loaded = load_router(tmp_path / "r", load_config(tiny_model_dir))
    torch.testing.assert_close(loaded(features), router(features))
    tok = load_tokenizer(tiny_model_dir)
    enc = tok(["Question: The zebra zebra has 3 plus 4?", "Question: The apple apple has 1 plus 2?"],
              return_tensors="pt", padding=True)
    assert loaded.route(emb, enc["input_ids"], enc["attention_mask"]).tolist() == [1, 0]  # hard, easy


def test_router_for_another_base_model_is_rejected(tiny_model_dir, tmp_path):
    _, _, emb = _separable(tiny_model_dir, n=8)
    from flexi_workflows.router import RankRouter

    save_router(RankRouter(_spec(emb)), tmp_path / "r")
    with pytest.raises(ConfigError, match=r"dim 32 and a vocabulary of \d+, but the base model has dim 64"):
        load_router(tmp_path / "r", tiny_llama_config(vocab_size=160))
    with pytest.raises(ConfigError, match="not a router folder"):
        load_router(tmp_path)


def test_input_embeddings_read_alone_match_the_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    emb = load_input_embeddings(tiny_model_dir)
    full = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).get_input_embeddings().weight
    assert isinstance(emb, nn.Embedding)
    torch.testing.assert_close(emb.weight, full.float())
