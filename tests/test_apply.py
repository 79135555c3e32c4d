"""rules/_apply.py: the fast path to the C++ apply, and its fallback to Function.apply."""

from __future__ import annotations

import importlib
import sys
import types

import torch

import manual_backprop.functional as MF
from manual_backprop import rules
from manual_backprop.rules import _apply
from manual_backprop.rules._native import python_rule


def count_public_applies(monkeypatch) -> list:
    calls = []
    original = torch.autograd.Function.apply.__func__

    def counting(cls, *args, **kwargs):
        calls.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(torch.autograd.Function, "apply", classmethod(counting))
    return calls


def linear_grads():
    torch.manual_seed(0)
    x, W, b = torch.randn(3, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True), torch.randn(2, requires_grad=True)
    z = MF.linear(x, W, b)
    assert type(z.grad_fn).__name__ == "LinearBackward"
    return torch.autograd.grad(z.sum(), [x, W, b])


def test_fast_path_skips_function_apply(monkeypatch):
    assert _apply._c_apply is not None  # the internals exist on the tested torch
    calls = count_public_applies(monkeypatch)
    linear_grads()
    assert calls == []


def test_without_the_private_internals_every_call_takes_function_apply(monkeypatch):
    with python_rule():  # the Python rules' apply path (their native twins never call it)
        expected = linear_grads()
        # As on a torch whose internals moved: the module's import of them fails, and it falls back.
        # (Only for the reload: Function.apply itself still finds them.)
        monkeypatch.setitem(sys.modules, "torch._functorch.utils", types.ModuleType("torch._functorch.utils"))
        try:
            importlib.reload(_apply)
            monkeypatch.undo()
            assert _apply._c_apply is None
            calls = count_public_applies(monkeypatch)
            got = linear_grads()
            assert calls == ["Linear"]
            assert _apply.apply_rule(rules.Sigmoid, torch.zeros(2)).tolist() == [0.5, 0.5]
        finally:
            monkeypatch.undo()
            importlib.reload(_apply)
        assert _apply._c_apply is not None
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------ native branch: the fast path's dead-wrapper check


def test_a_tensor_left_by_a_finished_transform_is_unwrapped_as_function_apply_does():
    leaked = []

    def f(x):
        leaked.append(x * 2)  # escapes torch.func.grad: a dead functorch wrapper afterwards
        return x.sum()

    torch.func.grad(f)(torch.randn(4, 3))
    (dead,) = leaked
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    W = torch.randn(2, 3, requires_grad=True)
    out = MF.linear(dead, W)
    assert type(out.grad_fn).__name__ == "LinearBackward"
    assert not torch._C._functorch.is_functorch_wrapped_tensor(out)
    torch.testing.assert_close(out, torch.nn.functional.linear(dead, W))
    out.sum().backward()
    torch.testing.assert_close(W.grad, dead.sum(0).expand(2, 3))


# ------------------------------------------------ per-layer overhead: direct_backward


def count_backward_c_function_applies(monkeypatch) -> list:
    calls = []
    original = torch.autograd.function.BackwardCFunction.apply

    def counting(self, *args):
        calls.append(type(self).__name__)
        return original(self, *args)

    monkeypatch.setattr(torch.autograd.function.BackwardCFunction, "apply", counting)
    return calls


def test_the_engine_calls_our_rules_backward_directly(monkeypatch):
    calls = count_backward_c_function_applies(monkeypatch)
    torch.manual_seed(0)
    x, W = torch.randn(3, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    z = MF.linear(x, W)
    out = MF.relu(MF.tanh(MF.sigmoid(z)))
    target = torch.randn(3, 2)
    grads = torch.autograd.grad(MF.mse_loss(out, target), [x, W])
    assert calls == []  # no node took Function's Python plumbing
    expected = torch.autograd.grad(
        torch.nn.functional.mse_loss(torch.relu(torch.tanh(torch.sigmoid(x @ W.T))), target), [x, W])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_hooks_on_a_direct_backward_node_still_run():
    x, W = torch.randn(3, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    z = MF.linear(x, W)
    seen = []
    z.grad_fn.register_prehook(lambda grad_outputs: seen.append("pre"))
    z.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append("post"))
    z.register_hook(lambda delta: delta * 2)  # on the tensor: doubles δ before our backward sees it
    z.sum().backward()
    assert seen == ["pre", "post"]
    torch.testing.assert_close(W.grad, 2 * torch.ones(2, 3) @ x.detach())


def test_a_patched_backward_is_what_runs():
    """The node calls the rule's backward as it is now: breaking a rule (as tests do) still shows."""
    original = rules.Sigmoid.backward
    try:
        rules.Sigmoid.backward = staticmethod(lambda ctx, delta: delta * 0)
        z = torch.randn(4, requires_grad=True)
        MF.sigmoid(z).sum().backward()
        assert not z.grad.any()
    finally:
        rules.Sigmoid.backward = original


def test_direct_backward_leaves_other_functions_to_torch():
    class WithVjp(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def vjp(ctx, grad):
            return grad * 2

    class Boxed(WithVjp):
        boxed_grads_call = True

    for function in (WithVjp, Boxed):
        assert _apply.direct_backward(function) is function
        assert "apply" not in vars(function._backward_cls)
    assert "apply" in vars(rules.Linear._backward_cls)  # and ours do take it
    x = torch.ones(2, requires_grad=True)
    WithVjp.apply(x).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0]
