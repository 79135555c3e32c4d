"""Direct feedback alignment: every hidden layer's δ is (e B(l)) ⊙ σ'(z), e the output layer's δ.

The expected gradients are written out here from the formula, with B(l) read from each layer's
``feedback`` buffer (shaped (K, out_features)).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import manual_backprop as mb
from manual_backprop import observe
from manual_backprop.plugins import direct_feedback_alignment as dfa

NAME = "direct_feedback_alignment"


def three_layer_grads(x, Ws, bs, Bs, g):
    """x → Linear → tanh → Linear → tanh → Linear (output) by hand, upstream g = e = ∂J/∂ŷ."""
    rows = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    xr, e = rows(x), rows(g)
    a1 = torch.tanh(xr @ Ws[0].T + (0 if bs[0] is None else bs[0]))
    a2 = torch.tanh(a1 @ Ws[1].T + (0 if bs[1] is None else bs[1]))
    delta3 = e  # the output layer's δ is e
    delta2 = (e @ Bs[1]) * (1 - a2**2)  # δ(2) = (e B(1)) ⊙ tanh'(z)
    delta1 = (e @ Bs[0]) * (1 - a1**2)  # δ(1) = (e B(0)) ⊙ tanh'(z)
    grads = {"W2": delta3.T @ a2, "W1": delta2.T @ a1, "W0": delta1.T @ xr,
             "b2": delta3.sum(0), "b1": delta2.sum(0), "b0": delta1.sum(0),
             "x": (delta1 @ Ws[0]).reshape(x.shape)}  # below the lowest DFA layer: backprop's δ W
    return grads


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4)], ids=["batch", "leading-dims"])
@pytest.mark.parametrize("fused", [False, True], ids=["sequential", "mlp"])
def test_hidden_deltas_are_e_B_times_sigma_prime(bias, shape, fused):
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 6, bias=bias), nn.Tanh(),
                          nn.Linear(6, 3, bias=bias)).double()
    model = mb.convert(nn.Sequential(mb.nn.MLP.from_sequential(stock)) if fused else stock, registry=NAME)
    layers = list(model[0].layers) if fused else [model[0], model[2], model[4]]
    Bs = [layer.feedback for layer in layers[:2]]
    assert [tuple(B.shape) for B in Bs] == [(3, 5), (3, 6)] and "feedback" not in layers[2]._buffers
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = model(x)
    assert torch.equal(out, stock(x))
    g = torch.randn_like(out)
    out.backward(g)
    want = three_layer_grads(x.detach(), [l.weight.detach() for l in layers],
                             [None if l.bias is None else l.bias.detach() for l in layers], Bs, g)
    for k, layer in enumerate(layers):
        torch.testing.assert_close(layer.weight.grad, want[f"W{k}"])
        if bias:
            torch.testing.assert_close(layer.bias.grad, want[f"b{k}"])
    torch.testing.assert_close(x.grad, want["x"])


def test_mlp_below_a_linear_head_and_a_marked_output():
    """A head registered before the body: plain convert refuses, registry(output=...) links it."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(6, 3)
            self.body = mb.nn.MLP([4, 5, 6], activation="tanh", output_activation="tanh")

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    net = Net().double()
    with pytest.raises(mb.ConversionError, match="'body' takes 4 features, but the DFA layer before it in registration order, 'head', gives 3"):
        mb.convert(net, registry=NAME)
    model = mb.convert(net, registry=dfa.registry(output="head"))
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    out = model(x)
    g = torch.randn_like(out)
    out.backward(g)
    L0, L1 = model.body.layers
    B0, B1 = L0.feedback, L1.feedback  # (3, 5), (3, 6): the body's top layer is hidden here
    a1 = torch.tanh(x.detach() @ L0.weight.detach().T + L0.bias.detach())
    a2 = torch.tanh(a1 @ L1.weight.detach().T + L1.bias.detach())
    delta2, delta1 = (g @ B1) * (1 - a2**2), (g @ B0) * (1 - a1**2)
    torch.testing.assert_close(model.head.weight.grad, g.T @ a2)
    torch.testing.assert_close(L1.weight.grad, delta2.T @ a1)
    torch.testing.assert_close(L0.weight.grad, delta1.T @ x.detach())
    torch.testing.assert_close(x.grad, delta1 @ L0.weight.detach())


def test_errors_name_what_is_missing():
    with pytest.raises(mb.ConversionError, match="no Linear or fused MLP to produce the output error e"):
        mb.convert(nn.Sequential(nn.Conv1d(1, 2, 3)), registry=NAME)
    with pytest.raises(mb.ConversionError, match="the output '1' is a convolution"):
        mb.convert(nn.Sequential(nn.Linear(2, 6), nn.Conv1d(1, 2, 3)), registry=dfa.registry(output="1"))
    with pytest.raises(mb.ConversionError, match=r"the output 'nope' is not a Linear, convolution or fused MLP of the model \(those are: \['0', '2'\]\)"):
        mb.convert(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)), registry=dfa.registry(output="nope"))
    model = mb.convert(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)), registry=NAME)
    hidden = model[:4](torch.randn(4, 2))  # the loss taken before the output layer: no e reaches layer 2
    with pytest.raises(RuntimeError, match="'2' ran backward before the output layer '4' did"):
        hidden.sum().backward()
    with pytest.raises(RuntimeError, match="not linked to a model's output"):
        dfa.Linear(2, 3)(torch.randn(1, 2))


def test_B_is_seeded_non_persistent_and_restore_brings_back_backprop():
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 5), nn.ReLU(), mb.nn.MLP([5, 6, 3]))
    torch.manual_seed(3)
    model = mb.convert(stock, registry=NAME)
    torch.manual_seed(3)
    again = mb.convert(stock, registry=NAME)
    assert list(model.state_dict()) == list(stock.state_dict())
    buffers = dict(model.named_buffers())
    assert {k: tuple(v.shape) for k, v in buffers.items()} == {"0.feedback": (3, 8), "3.feedback": (3, 5),
                                                                 "5.layers.0.feedback": (3, 6)}
    for name, B in buffers.items():
        torch.testing.assert_close(B, dict(again.named_buffers())[name])
    copied = copy.deepcopy(model)  # the copy's layers share the copy's own OutputError
    assert copied[3]._dfa.error is copied[5]._dfa.error is not model[5]._dfa.error
    assert type(model[0]) is dfa.Conv1d
    back = mb.restore(model)
    assert [type(m) for m in back] == [type(m) for m in stock] and dict(back.named_buffers()) == {}
    assert "_dfa" not in vars(back[3])
    x = torch.randn(2, 1, 6)
    back(x).square().sum().backward()
    stock(x).square().sum().backward()
    for (name, p), q in zip(back.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_observe_sees_the_dfa_delta_and_alignment_reports_updates():
    torch.manual_seed(0)
    model = mb.convert(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(), registry=NAME)

    class Keep:
        keep_output = False
        seen: dict = {}

        def see(self, seen):
            self.seen[seen.name] = seen.delta

    x = torch.randn(6, 4, dtype=torch.float64)
    with observe.watch(model, Keep()):
        out = model(x)
        g = torch.randn_like(out)
        out.backward(g)
    a1 = torch.tanh(model[0](x)).detach()
    torch.testing.assert_close(Keep.seen["0"], (g @ model[0].feedback) * (1 - a1**2))
    rows = mb.alignment(model, x, torch.randint(3, (6,)), nn.functional.cross_entropy)
    assert rows["2"].update < 1e-3 and rows["0"].feedback is None and rows["0"].update > 1


@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
def test_convolutions_get_e_through_B_shaped_like_the_next_layers_input(unbatched):
    """conv → ReLU → pool → conv → tanh → flatten → Linear → tanh → Linear: each hidden layer's input gradient is e B."""
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 3, 3, padding=1),
                          nn.Tanh(), nn.Flatten(-3), nn.Linear(3 * 4 * 4, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    torch.manual_seed(5)
    model = mb.convert(stock, registry=NAME)
    x = torch.randn(*([] if unbatched else [2]), 1, 8, 8, dtype=torch.float64, requires_grad=True)
    out = model(x)
    assert torch.equal(out, stock(x))
    g = torch.randn_like(out)
    out.backward(g)
    B0, B3, B6 = model[0].feedback, model[3].feedback, model[6].feedback
    assert (B0.shape, B3.shape, B6.shape) == ((4, 2, 4, 4), (4, 48), (4, 5))  # B0: the pooled map conv 3 takes
    e = g.reshape(-1, 4)
    # the stock layers' own backprop, fed the DFA input gradient at each hidden layer
    x0 = x.detach().requires_grad_()
    z0 = stock[0](x0)
    pooled = stock[2](torch.relu(z0))
    p1 = pooled.detach().requires_grad_()
    z3 = stock[3](p1)
    f = torch.tanh(z3).flatten(-3).detach().requires_grad_()
    z6 = stock[6](f)
    a6 = torch.tanh(z6)
    stock.zero_grad()
    stock[8](a6.detach()).backward(g)  # the output layer: δ = e
    z6.backward((e @ B6).reshape(a6.shape) * (1 - a6.detach() ** 2))
    a3 = torch.tanh(z3.detach())
    z3.backward((e @ B3).reshape(z3.shape) * (1 - a3**2))
    pooled.backward((e @ B0.flatten(1)).reshape(pooled.shape))  # through the pool and ReLU', as backprop
    for k in (0, 3, 6, 8):
        torch.testing.assert_close(model[k].weight.grad, stock[k].weight.grad, msg=str(k))
        torch.testing.assert_close(model[k].bias.grad, stock[k].bias.grad, msg=str(k))
    torch.testing.assert_close(x.grad, x0.grad)  # below the lowest layer: backprop's
    torch.manual_seed(5)
    again = mb.convert(stock, registry=NAME)
    again(x)  # the convolution's B(below) is drawn at the first forward, from a seed drawn at convert
    torch.testing.assert_close(again[0].feedback, B0)


def test_a_padding_convolution_sends_e_B_through_its_padding():
    """padding_mode="reflect": the rule sees the padded input, so B is shaped like it and the Pad rule's
    backward folds e B back onto the input, as backprop would fold any gradient."""
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"),
                          nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    model = mb.convert(stock, registry=NAME)
    x = torch.randn(4, 1, 8, dtype=torch.float64)
    out = model(x)
    g = torch.randn_like(out)
    out.backward(g)
    B0 = model[0].feedback
    assert B0.shape == (3, 2, 8)  # conv 2's padded input: 6 + 2 reflected positions
    a1 = torch.tanh(stock[0](x)).detach().requires_grad_()
    padded = nn.functional.pad(a1, (1, 1), mode="reflect")
    padded.backward((g @ B0.flatten(1)).reshape(padded.shape))  # ∂J/∂a1 = the padding's backward of e B
    stock.zero_grad()
    torch.tanh(stock[0](x)).backward(a1.grad)
    torch.testing.assert_close(model[0].weight.grad, stock[0].weight.grad)
