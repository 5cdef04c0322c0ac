"""training.gradient_checkpointing: the same loss and adapter gradients as without it, on a real model."""

from __future__ import annotations

import copy

import torch

from flexi_workflows.adapters import FlexiLoraConfig, inject_flexi_lora
from flexi_workflows.training.loop import enable_gradient_checkpointing
from tests.conftest import make_tiny_llama, randomize_lora


def _loss_and_grads(model, ids, ranks):
    model.train()
    loss = model(input_ids=ids, labels=ids, ranks=ranks).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointing_gives_the_same_loss_and_adapter_gradients_with_mixed_ranks():
    base = make_tiny_llama()
    plain = inject_flexi_lora(copy.deepcopy(base), FlexiLoraConfig(r_max=8, targets=["q_proj", "v_proj", "down_proj"]))
    randomize_lora(plain, std=0.2)
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed.base_model)
    assert checkpointed.base_model.is_activation_checkpointing and not plain.base_model.is_activation_checkpointing
    ids = torch.randint(3, 96, (3, 12), generator=torch.Generator().manual_seed(0))
    ranks = [2, 8, 5]
    loss_a, grads_a = _loss_and_grads(plain, ids, ranks)
    loss_b, grads_b = _loss_and_grads(checkpointed, ids, ranks)
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a and set(grads_a) == set(grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)
    assert any(g.abs().sum() > 0 for g in grads_a.values())
