"""The feedback family (FA, uSF, brSF, frSF): gradients against the formulas written out here.

    ∂J/∂a = δ B (conv: the transposed convolution of δ with B),  ∂J/∂W = δᵀ a,  ∂J/∂b = Σ δ
    FA: B = M    uSF: B = sign(W)    brSF: B = |M| ⊙ sign(W), M drawn at each backward    frSF: B = |M| ⊙ sign(W)

B is computed in each test from W, the buffer and (brSF) the RNG state, not by the plugin's helpers.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

import manual_backprop as mb
from manual_backprop import observe
from manual_backprop.plugins import feedback_alignment as fa
from tests.cases import DEVICES

RULES = ["feedback_alignment", "sign_symmetry", "batchwise_random_sign_symmetry", "fixed_random_sign_symmetry"]
KEEPS_M = {"feedback_alignment", "fixed_random_sign_symmetry"}
SEED = 1234  # the RNG state at backward, for brSF's fresh M


def expected_Bs(rule: str, Ws: list[torch.Tensor], Ms: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """B for each weight, in the order backward makes them (top layer first), by the rule's formula."""
    torch.manual_seed(SEED)
    Bs = []
    for W, M in zip(Ws, Ms):
        W = W.detach()
        if rule == "feedback_alignment":
            Bs.append(M)
        elif rule == "sign_symmetry":
            Bs.append(torch.sign(W))
        elif rule == "fixed_random_sign_symmetry":
            Bs.append(M.abs() * torch.sign(W))
        else:  # a fresh M, uniform in ±1/√fan_in, as the weight's own init
            bound = 1 / math.sqrt(W[0].numel())
            fresh = torch.empty(W.shape, dtype=W.dtype).uniform_(-bound, bound)
            Bs.append(fresh.abs() * torch.sign(W))
    return Bs


def backward_at_seed(output: torch.Tensor, upstream: torch.Tensor) -> None:
    torch.manual_seed(SEED)
    output.backward(upstream)


# ---------------------------------------------------------------- Linear and the fused MLP


def two_layer_grads(rule, x, W0, b0, W1, b1, M0, M1, g):
    """Linear → tanh → Linear by hand, upstream g = ∂J/∂out: the notes' loop with B(l) in place of W(l)."""
    B1, B0 = expected_Bs(rule, [W1, W0], [M1, M0])
    a1 = torch.tanh(x @ W0.T + (b0 if b0 is not None else 0))
    delta2 = g.reshape(-1, g.shape[-1])  # δ at the output, every leading dimension flattened
    a1r, xr = a1.reshape(-1, a1.shape[-1]), x.reshape(-1, x.shape[-1])
    grads = {"W1": delta2.T @ a1r, "b1": delta2.sum(0)}  # last layer: backprop's, unchanged
    delta1 = (delta2 @ B1) * (1 - a1r**2)  # δ(1) = (δ(2) B(1)) ⊙ tanh'(z(1))
    grads |= {"W0": delta1.T @ xr, "b0": delta1.sum(0), "x": (delta1 @ B0).reshape(x.shape)}
    return grads


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4)], ids=["batch", "leading-dims"])
@pytest.mark.parametrize("fused", [False, True], ids=["sequential", "mlp"])
def test_linear_and_mlp_gradients_are_the_formula(rule, bias, shape, fused):
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias)).double()
    model = mb.nn.MLP.from_sequential(stock) if fused else stock
    model = mb.convert(nn.Sequential(model) if fused else model, registry=rule)
    layers = list(model[0].layers) if fused else [model[0], model[2]]
    Ms = [layer._buffers.get("feedback") for layer in layers]
    assert all((M is not None) == (rule in KEEPS_M) for M in Ms)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = model(x)
    assert torch.equal(out, stock(x))  # forward: backprop's
    g = torch.randn_like(out)
    backward_at_seed(out, g)
    W0, W1 = layers[0].weight, layers[1].weight
    b0, b1 = layers[0].bias, layers[1].bias
    want = two_layer_grads(rule, x.detach(), W0.detach(), None if b0 is None else b0.detach(), W1.detach(),
                           None if b1 is None else b1.detach(), Ms[0], Ms[1], g)
    torch.testing.assert_close(W1.grad, want["W1"])
    torch.testing.assert_close(W0.grad, want["W0"])
    torch.testing.assert_close(x.grad, want["x"])
    if bias:
        torch.testing.assert_close(b1.grad, want["b1"])
        torch.testing.assert_close(b0.grad, want["b0"])
    grad_fn = out.grad_fn.name()
    assert grad_fn == ("FeedbackMLPBackward" if fused else "FeedbackLinearBackward")


def test_brsf_draws_a_new_M_at_every_backward():
    torch.manual_seed(0)
    layer = mb.convert(nn.Linear(4, 3), registry="batchwise_random_sign_symmetry")
    x = torch.randn(5, 4, requires_grad=True)
    grads = []
    for _ in range(2):
        x.grad = None
        layer(x).sum().backward()
        grads.append(x.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
    # every B it drew had sign(W): the gradient of Σ z through row-sums of B keeps sign(Σ_out sign(W)·|M|)
    assert "feedback" not in dict(layer.named_buffers())


# ---------------------------------------------------------------- convolutions


CONVS = [
    (nn.Conv1d, dict(kernel_size=3), (2, 4, 9)),
    (nn.Conv2d, dict(kernel_size=3, stride=2, padding=1, groups=2), (2, 4, 7, 6)),
    (nn.Conv2d, dict(kernel_size=2, padding=1, padding_mode="circular", bias=False), (4, 5, 5)),  # unbatched
    (nn.Conv3d, dict(kernel_size=2, dilation=2, padding="same"), (1, 4, 5, 5, 5)),
]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("stock_cls, config, shape", CONVS, ids=["1d", "2d-stride-groups", "2d-circular-unbatched", "3d-same"])
def test_conv_gradients_are_the_formula(rule, stock_cls, config, shape):
    torch.manual_seed(0)
    stock = stock_cls(4, 6, **config).double()
    conv = mb.convert(stock, registry=rule)
    M = conv._buffers.get("feedback")
    a = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    z = conv(a)
    assert torch.equal(z, stock(a))
    delta = torch.randn_like(z)
    backward_at_seed(z, delta)
    (B,) = expected_Bs(rule, [conv.weight], [M])
    # ∂J/∂a: backprop's input gradient of the same convolution with B as its weight (the transposed convolution of δ with B)
    with_B = copy.deepcopy(stock)
    with_B.weight.data.copy_(B)
    a2 = a.detach().requires_grad_()
    with_B(a2).backward(delta)
    torch.testing.assert_close(a.grad, a2.grad)
    # ∂J/∂W, ∂J/∂b: backprop's, unchanged
    stock.zero_grad()
    stock(a.detach()).backward(delta)
    torch.testing.assert_close(conv.weight.grad, stock.weight.grad)
    if stock.bias is not None:
        torch.testing.assert_close(conv.bias.grad, stock.bias.grad)
    assert z.grad_fn.name() == "FeedbackConvolutionBackward"


# ---------------------------------------------------------------- buffers, restore, state


@pytest.mark.parametrize("rule", RULES)
def test_M_is_a_non_persistent_buffer_seeded_by_torch_and_restore_brings_back_backprop(rule):
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), mb.nn.MLP([8, 5, 3]))
    keys = list(stock.state_dict())
    torch.manual_seed(7)
    model = mb.convert(stock, registry=rule)
    torch.manual_seed(7)
    again = mb.convert(stock, registry=rule)
    assert list(model.state_dict()) == keys
    buffers = dict(model.named_buffers())
    if rule in KEEPS_M:
        assert set(buffers) == {"0.feedback", "3.layers.0.feedback", "3.layers.1.feedback"}
        for name, M in buffers.items():
            torch.testing.assert_close(M, dict(again.named_buffers())[name])  # the same seed, the same M
            assert M.shape == model.get_submodule(name.removesuffix(".feedback")).weight.shape
    else:
        assert buffers == {}
    model = pickle.loads(pickle.dumps(model))  # module-level classes: pickles by reference
    back = mb.restore(model)
    assert [type(m) for m in back] == [type(m) for m in stock] and dict(back.named_buffers()) == {}
    x = torch.randn(2, 1, 4, 4)
    back(x).square().sum().backward()
    stock(x).square().sum().backward()
    for (name, p), q in zip(back.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_every_rule_set_is_offered_and_repr_keeps_torch_names():
    assert set(RULES) <= set(mb.default_registry().rule_set_names())
    assert set(RULES) <= set(mb.learning_rule_names())
    layer = mb.convert(nn.Linear(2, 3), registry="sign_symmetry")
    assert type(layer) is fa.SignSymmetryLinear and repr(layer) == repr(nn.Linear(2, 3))
    with pytest.raises(KeyError, match="no feedback rule set named 'nope'"):
        fa.registry("nope")


def test_the_seen_delta_is_the_rules_delta():
    """observe (per-sample gradients, the tape) sees the δ the rule made, in the fused MLP and conv too."""
    torch.manual_seed(0)
    model = mb.convert(nn.Sequential(nn.Conv1d(2, 3, 2), nn.Tanh(), nn.Flatten(), mb.nn.MLP([9, 4, 2])).double(),
                       registry="sign_symmetry")

    class Keep:
        keep_output = False

        def __init__(self):
            self.seen = {}

        def see(self, seen):
            self.seen[seen.name] = seen

    keep = Keep()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    with observe.watch(model, keep):
        model(x).sum().backward()
    assert set(keep.seen) == {"0", "3.layers.0", "3.layers.1"}
    for name, seen in keep.seen.items():
        grads = seen.per_sample(seen.delta, seen.input)
        owner = model.get_submodule(name)
        torch.testing.assert_close(grads[0].sum(0), owner.weight.grad)  # per-sample gradients of the rule's δ
        torch.testing.assert_close(seen.sq_norms(seen.delta, seen.input),
                                   sum(g.flatten(1).square().sum(1) for g in grads if g is not None))
    # the conv's δ is the tanh' of what the MLP sent through sign(W(0)): not backprop's
    layer0 = model[3].layers[0]
    upstream = keep.seen["3.layers.0"].delta @ torch.sign(layer0.weight.detach())
    z = model[0](x)
    torch.testing.assert_close(keep.seen["0"].delta, upstream.reshape(z.shape) * (1 - torch.tanh(z.detach()) ** 2))


def test_double_backward_and_compile_and_vmap():
    torch.manual_seed(0)
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda a, W, b: fa.feedback_linear(a, W, b, None, fa.sign_B), (a, W, b))
    a4 = torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True)
    W4 = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(
        lambda a, W: fa.feedback_conv("conv1d", 1, a, W, None, 1, 0, 1, 1, None, fa.sign_B), (a4, W4))
    model = mb.convert(nn.Sequential(nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 1, 1), nn.Flatten(), mb.nn.MLP([4, 5, 2])),
                       registry="sign_symmetry")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    x = torch.randn(3, 4)
    compiled(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    torch.testing.assert_close(torch.func.vmap(model)(x[:, None]).squeeze(1), model(x))


# ---------------------------------------------------------------- alignment


def test_alignment_angles():
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(3, (16,))
    loss = nn.functional.cross_entropy
    same = mb.alignment(mb.convert(stock), x, y, loss)
    assert set(same) == {"0", "2"} and all(r.update < 1e-3 and r.feedback is None for r in same.values())
    model = mb.convert(stock, registry="feedback_alignment")
    rows = mb.alignment(model, x, y, loss)
    assert rows["2"].update < 1e-3  # the top layer's update needs no propagated δ
    assert 1 < rows["0"].update < 179
    W, B = model[2].weight.detach().flatten(), model[2].feedback.flatten()
    assert rows["2"].feedback == pytest.approx(math.degrees(math.acos(W @ B / (W.norm() * B.norm()))))
    sign = mb.alignment(mb.convert(stock, registry="sign_symmetry"), x, y, loss)
    assert sign["0"].feedback < 90 and sign["0"].update < rows["0"].update  # sign(W) lies close to W
    assert stock[0].weight.grad is None  # .grad untouched
    state = torch.random.get_rng_state()
    mb.alignment(mb.convert(stock, registry="batchwise_random_sign_symmetry"), x, y, loss)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG untouched


def test_alignment_keys_any_model_by_its_own_names_and_a_missing_one_lists_them():
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(3, (8,))
    loss = nn.functional.cross_entropy
    plain = mb.convert(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), registry="feedback_alignment")
    fused = mb.convert(nn.Sequential(mb.nn.MLP([4, 6, 3], activation="tanh")), registry="feedback_alignment")
    assert list(mb.alignment(plain, x, y, loss)) == ["0", "2"]
    assert list(mb.alignment(fused, x, y, loss)) == ["0.layers.0", "0.layers.1"]
    rows = mb.alignment(plain, x, y, loss)
    with pytest.raises(KeyError, match=r"no layer named 'layers\.0' .* its layers are: '0', '2'"):
        rows["layers.0"]
    assert rows.get("layers.0") is None and "0" in rows  # the rest of dict's interface is dict's


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", RULES + ["direct_feedback_alignment"])
def test_every_rule_on_each_device_and_under_autocast(device, rule):
    """Buffers follow .to(device); under autocast the rules' backward runs with B in the gradient's dtype."""
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 6), nn.Tanh(),
                          mb.nn.MLP([6, 5, 3])).to(device)
    model = mb.convert(stock, registry=rule).to(device)
    assert all(B.device.type == device for B in model.buffers())
    x = torch.randn(3, 1, 4, 4, device=device)
    torch.testing.assert_close(model(x), stock(x), rtol=0, atol=0)
    dtype = torch.bfloat16
    with torch.autocast(device, dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all()
               for p in model.parameters())
