"""The nested-rank layer: per-sample ranks, gradients, dtypes, shapes, torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flexi_workflows.adapters import FlexiLoraConfig, FlexiLoraModel
from flexi_workflows.adapters.layer import FlexiLoraLinear, RankState
from tests.conftest import make_tiny_llama, randomize_lora


def _layer(r_max=8, scaling="alpha_over_r", in_f=12, out_f=10, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = FlexiLoraConfig(r_max=r_max, alpha=16, scaling=scaling, adapter_dtype="base")
    base = nn.Linear(in_f, out_f).to(dtype)
    state = RankState(cfg)
    layer = FlexiLoraLinear(base, cfg, state)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer, state, cfg


def _reference(layer: FlexiLoraLinear, x: torch.Tensor, rank: int) -> torch.Tensor:
    """Sample at rank r sees W + γ(r) B[:, :r] A[:r] — written out densely."""
    w = layer.base_layer.weight + layer.delta_weight(rank)
    return nn.functional.linear(x, w, layer.base_layer.bias)


@pytest.mark.parametrize("scaling", ["alpha_over_r", "alpha_over_sqrt_r", "learned", "constant"])
@pytest.mark.parametrize("shape", [(4, 12), (4, 5, 12)])
def test_mixed_ranks_match_dense_reference(scaling, shape):
    layer, state, _ = _layer(scaling=scaling)
    x = torch.randn(*shape)
    ranks = torch.tensor([1, 8, 3, 8])
    with state.using(ranks, None):
        y = layer(x)
    for b, r in enumerate(ranks.tolist()):
        torch.testing.assert_close(y[b], _reference(layer, x[b], r), atol=1e-5, rtol=1e-5)


def test_scalings_differ_as_documented():
    for scaling, expect in [("alpha_over_r", 16 / 4), ("alpha_over_sqrt_r", 16 / 2), ("constant", 16 / 8)]:
        layer, _, cfg = _layer(scaling=scaling)
        assert cfg.gamma(4) == pytest.approx(expect)
        assert float(layer.gamma(4)) == pytest.approx(expect)
    layer, _, _ = _layer(scaling="learned")
    assert isinstance(layer.lora_gamma, nn.Parameter) and layer.lora_gamma.requires_grad
    assert float(layer.gamma(4)) == pytest.approx(16 / 4)


def test_uniform_fast_path_equals_masked_path():
    layer, state, _ = _layer()
    x = torch.randn(3, 7, 12)
    ranks = torch.full((3,), 5)
    with state.using(ranks, 5):
        fast = layer(x)
    with state.using(ranks, None):
        masked = layer(x)
    torch.testing.assert_close(fast, masked, atol=1e-6, rtol=1e-5)


def test_gradients_stay_inside_each_samples_rank():
    layer, state, _ = _layer()
    layer.base_layer.weight.requires_grad_(False)
    layer.base_layer.bias.requires_grad_(False)
    x = torch.randn(1, 6, 12)
    with state.using(torch.tensor([3]), None):
        layer(x).pow(2).sum().backward()
    assert layer.lora_A.grad[3:].abs().max() == 0
    assert layer.lora_B.grad[:, 3:].abs().max() == 0
    assert layer.lora_A.grad[:3].abs().max() > 0
    assert layer.lora_B.grad[:, :3].abs().max() > 0
    assert layer.base_layer.weight.grad is None


def test_mixed_batch_gradient_is_sum_of_per_sample_gradients():
    layer, state, _ = _layer()
    x = torch.randn(2, 4, 12)
    ranks = torch.tensor([2, 6])
    with state.using(ranks, None):
        layer(x).pow(2).sum().backward()
    joint = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    layer.zero_grad()
    for b in range(2):
        with state.using(ranks[b : b + 1], None):
            layer(x[b : b + 1]).pow(2).sum().backward()
    torch.testing.assert_close(joint[0], layer.lora_A.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joint[1], layer.lora_B.grad, atol=1e-5, rtol=1e-5)
    # the rank-2 sample alone never reaches column 6 and beyond; nothing does
    assert layer.lora_B.grad[:, 6:].abs().max() == 0


def test_bf16_base_with_fp32_adapter():
    torch.manual_seed(0)
    cfg = FlexiLoraConfig(r_max=4, alpha=8)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    state = RankState(cfg)
    layer = FlexiLoraLinear(base, cfg, state)
    assert layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 2, 16, dtype=torch.bfloat16)
    with state.using(torch.tensor([1, 4, 2]), None):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    for b, r in enumerate([1, 4, 2]):
        ref = base(x[b]).float() + nn.functional.linear(x[b].float(), layer.delta_weight(r))
        torch.testing.assert_close(y[b].float(), ref, atol=0.05, rtol=0.02)


def test_bf16_everything_trains():
    model = make_tiny_llama().to(torch.bfloat16)
    flexi = FlexiLoraModel(model, FlexiLoraConfig(r_max=4, adapter_dtype="base"))
    flexi.train()
    ids = torch.randint(3, 96, (2, 8))
    out = flexi(input_ids=ids, labels=ids, ranks=[1, 4])
    out.loss.backward()
    grads = [layer.lora_B.grad for _, layer in flexi.flexi_layers()]
    assert all(g is not None and g.dtype == torch.bfloat16 for g in grads)


def test_compiles_without_graph_breaks():
    layer, state, _ = _layer()
    x = torch.randn(4, 3, 12)
    ranks = torch.tensor([1, 2, 8, 4])
    with state.using(ranks, None):
        eager = layer(x)
        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), eager)


def test_model_with_mixed_ranks_compiles():
    model = make_tiny_llama()
    flexi = FlexiLoraModel(model, FlexiLoraConfig(r_max=8))
    randomize_lora(flexi)
    ids = torch.randint(3, 96, (3, 6))
    eager = flexi(input_ids=ids, ranks=[2, 8, 2]).logits
    flexi.base_model = torch.compile(flexi.base_model, backend="eager")
    torch.testing.assert_close(flexi(input_ids=ids, ranks=[2, 8, 2]).logits, eager)
