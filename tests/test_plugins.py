"""Feedback alignment, the worked plugin: δ goes back through B, the weight gradients stay δᵀ a."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import manual_backprop as mb
from manual_backprop.plugins import feedback_alignment as fa
from manual_backprop.testing import grad_parity
from tests.cases import DEVICES


def _captured_delta(linear: nn.Module, a: torch.Tensor, upstream: torch.Tensor):
    """Run z = linear(a), backprop `upstream` from z; return δ = ∂J/∂z as the layer saw it."""
    z = linear(a)
    deltas = []
    z.register_hook(deltas.append)
    z.backward(upstream)
    return deltas[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4)], ids=["batch", "batch-seq"])
def test_weight_gradients_are_delta_a_and_delta_goes_through_B(device, bias, shape):
    layer = fa.Linear(4, 3, bias=bias, device=device, dtype=torch.float64)
    a = torch.randn(shape, device=device, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(*shape[:-1], 3, device=device, dtype=torch.float64)
    delta = _captured_delta(layer, a, upstream)
    assert layer(a).grad_fn.name() == "FeedbackLinearBackward"
    rows, a_rows = delta.reshape(-1, 3), a.detach().reshape(-1, 4)
    torch.testing.assert_close(layer.weight.grad, rows.T @ a_rows)  # ∂J/∂W = δᵀ a, unchanged
    if bias:
        torch.testing.assert_close(layer.bias.grad, rows.sum(0))  # ∂J/∂b = Σ δ
    torch.testing.assert_close(a.grad, delta @ layer.feedback)  # δ B ...
    assert not torch.allclose(a.grad, delta @ layer.weight.detach())  # ... not δ W


def test_forward_is_the_stock_linear():
    layer = fa.Linear(4, 3)
    stock = nn.Linear(4, 3)
    stock.load_state_dict(layer.state_dict())
    x = torch.randn(6, 4)
    torch.testing.assert_close(layer(x), stock(x))


def test_B_is_fixed_shaped_like_W_and_not_in_the_state_dict():
    model = mb.convert(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), registry="feedback_alignment")
    layer = model[0]
    assert type(layer) is fa.Linear and isinstance(layer, nn.Linear)
    assert layer.feedback.shape == layer.weight.shape and not layer.feedback.requires_grad
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert set(dict(model.named_buffers())) == {"0.feedback", "2.feedback"}
    bound = 1 / 4**0.5
    assert layer.feedback.abs().max() <= bound
    B = layer.feedback.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    torch.testing.assert_close(layer.feedback, B)  # trained W moves, B does not
    assert mb.convert(model, registry="feedback_alignment", inplace=True)[0].feedback is layer.feedback


def test_B_follows_to_and_restore_removes_it():
    model = mb.convert(nn.Sequential(nn.Linear(4, 3)), registry=fa.registry())
    model = model.to(torch.float64)
    assert model[0].feedback.dtype == torch.float64
    back = mb.restore(model)  # recognised without naming the rule set
    assert type(back[0]) is nn.Linear and "feedback" not in dict(back.named_buffers())


def test_rule_set_is_selectable_and_offered_by_the_real_entry_point():
    from importlib.metadata import entry_points

    (entry_point,) = [ep for ep in entry_points(group="manual_backprop.rules") if ep.name == "feedback_alignment"]
    assert entry_point.load() is fa
    assert "feedback_alignment" in mb.default_registry().rule_set_names()
    assert mb.default_registry().rule_for(nn.Linear).manual is mb.nn.Linear  # not overridden for everyone
    rules = mb.default_registry().rule_set("feedback_alignment")
    assert rules.rule_for(nn.Linear).manual is fa.Linear and rules.rule_for(nn.Tanh).manual is mb.nn.Tanh


def test_parity_tools_see_the_difference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    result = grad_parity(model, x, y, nn.MSELoss(), registry="feedback_alignment")
    failed = {r.name for r in result.failures}
    # the last layer's gradients need no propagated δ: they match backprop; everything below uses B
    assert failed == {"grad input[0]", "grad 0.weight", "grad 0.bias"}
    assert result.rule_nodes["FeedbackLinearBackward"] == 2


def test_feedback_alignment_learns():
    """The point of FA: W comes to align with B and the loss still falls on a linear teacher task."""
    torch.manual_seed(0)
    teacher = torch.randn(4, 2, dtype=torch.float64)
    model = mb.convert(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).double(), registry="feedback_alignment")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(64, 4, dtype=torch.float64)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), x @ teacher)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_feedback_shape_mismatch_is_named():
    with pytest.raises(mb.InputError, match=r"feedback must have the weight's shape \(3, 4\), got \(4, 3\)"):
        fa.feedback_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(4, 3))


def test_vmap_and_deepcopy():
    layer = fa.Linear(4, 3)
    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone.feedback, layer.feedback)
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(torch.func.vmap(layer)(x), layer(x))
