"""ZeRO-3's F.linear: DeepSpeed's, less the saved input of frozen weights (engines.frozen_aware_zero3_linear).

On the H200 check DeepSpeed's own ZeRO-3 linear kept 1.27 GiB more than ZeRO-2 after each forward (the
inputs of every frozen MLP projection); the function put in its place must give the same outputs and
gradients, keep saving the weight parameter itself (so ZeRO-3 can free its gathered copy), and save a
frozen weight's input no more."""

from __future__ import annotations

import pytest
import torch
from deepspeed.runtime.zero.linear import zero3_linear_wrap

from flexi_workflows.training import engines


@pytest.fixture
def deepspeed_linear(monkeypatch):
    """The process as DeepSpeed's zero.Init leaves it (memory_efficient_linear on); restored after."""
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)


def _run(linear, weight_trained: bool, bias: bool):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(6, 8), requires_grad=weight_trained)
    b = torch.nn.Parameter(torch.randn(6), requires_grad=weight_trained) if bias else None
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = linear(x, w, b)
    (y.square().sum()).backward()
    return y.detach(), x.grad, None if w.grad is None else w.grad.clone(), saved, x, w


@pytest.mark.parametrize("weight_trained", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_outputs_and_gradients_are_torchs(deepspeed_linear, weight_trained, bias):
    assert engines.frozen_aware_zero3_linear() is True
    assert torch.nn.functional.linear is engines._zero3_linear
    y, gx, gw, _, _, _ = _run(torch.nn.functional.linear, weight_trained, bias)
    ry, rgx, rgw, _, _, _ = _run(torch._C._nn.linear, weight_trained, bias)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(gx, rgx)
    if weight_trained:
        torch.testing.assert_close(gw, rgw)
    else:
        assert gw is None


def test_a_frozen_weights_input_is_not_saved_but_the_weight_parameter_is(deepspeed_linear):
    # DeepSpeed's own function saves the input whatever the weight: the 1.27 GiB
    *_, ds_saved, x, _ = _run(zero3_linear_wrap, weight_trained=False, bias=False)
    assert any(t is x for t in ds_saved)
    engines.frozen_aware_zero3_linear()
    *_, saved, x, w = _run(torch.nn.functional.linear, weight_trained=False, bias=False)
    assert not any(t is x for t in saved)
    # the parameter object itself, not a view of its data: ZeRO-3 frees and re-gathers it for the backward
    assert any(t is w for t in saved)
    assert not any(t is not w and t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for t in saved)
    # a trained weight needs its input for the weight's gradient
    *_, saved, x, _ = _run(torch.nn.functional.linear, weight_trained=True, bias=False)
    assert any(t is x for t in saved)


def test_torchs_linear_stays_when_deepspeed_did_not_replace_it(monkeypatch):
    # memory_efficient_linear off (a distribution.deepspeed_config file): nothing to take the place of
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)
    assert engines.frozen_aware_zero3_linear() is False
    assert torch.nn.functional.linear is torch._C._nn.linear
