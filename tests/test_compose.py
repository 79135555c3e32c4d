"""Our rules compose with what PyTorch users rely on: dtypes, autocast, torch.func, torch.compile."""

from functools import partial

import pytest
import torch
import torch.nn.functional as TF

import manual_backprop.functional as MF
import manual_backprop.nn as mnn
from tests.cases import ACTIVATIONS, CUDA, DEVICES, LOSSES, assert_parity, tolerance

LOW = [torch.bfloat16, torch.float16]


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [torch.float64, *LOW], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_linear_dtypes(dtype, device):
    inputs = [torch.randn(4, 3, 5, device=device).to(dtype), torch.randn(2, 5, device=device).to(dtype), torch.randn(2, device=device).to(dtype)]
    assert_parity(MF.linear, TF.linear, inputs, "LinearBackward", **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, *LOW], ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=repr)
def test_activation_dtypes(activation, dtype, device):
    z = torch.empty(4, 6).uniform_(*activation.domain).to(device=device, dtype=dtype)
    assert_parity(activation.ours, activation.stock, [z], activation.grad_fn, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, *LOW], ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_loss_dtypes(loss, dtype, device):
    inputs = list(loss.make(5, device, dtype, torch.Generator().manual_seed(0)))
    try:
        loss.stock(*[t.clone() for t in inputs])
    except RuntimeError as stock_error:  # torch lacks this kernel for the dtype on this device
        with pytest.raises(RuntimeError):
            loss.ours(*inputs)
        pytest.skip(f"torch itself does not support it: {stock_error}")
    assert_parity(loss.ours, loss.stock, inputs, loss.grad_fn, **tolerance(dtype))


# ----------------------------------------------------------------- autocast

# device type, autocast dtype
AUTOCAST = [("cpu", torch.bfloat16), pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device")), pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device"))]

# (name, ours, stock, input makers on a device): every functional op under autocast
AUTOCAST_OPS = [(a.name, a.ours, a.stock, lambda d: [torch.randn(4, 6, device=d)]) for a in ACTIVATIONS] + [
    ("linear", MF.linear, TF.linear, lambda d: [torch.randn(4, 6, device=d), torch.randn(3, 6, device=d), torch.randn(3, device=d)]),
    ("softmax_dtype", partial(MF.softmax, dim=1, dtype=torch.float64), partial(TF.softmax, dim=1, dtype=torch.float64), lambda d: [torch.randn(4, 6, device=d)]),
] + [(loss.name, loss.ours, loss.stock, lambda d, loss=loss: list(loss.make(5, d, torch.float32, torch.Generator().manual_seed(0)))) for loss in LOSSES]


def _under_autocast(fn, device_type, dtype):
    def run(*args):
        with torch.autocast(device_type, dtype=dtype):
            return fn(*args)

    return run


@pytest.mark.parametrize("device_type,dtype", AUTOCAST)
@pytest.mark.parametrize("name,ours,stock,make", AUTOCAST_OPS, ids=[op[0] for op in AUTOCAST_OPS])
def test_autocast_matches_stock_dtypes_and_values(name, ours, stock, make, device_type, dtype):
    inputs = make(device_type)
    try:
        _under_autocast(stock, device_type, dtype)(*[t.clone() for t in inputs])
    except RuntimeError as refused:  # CUDA autocast refuses binary_cross_entropy; so must we
        assert "unsafe to autocast" in str(refused)
        with pytest.raises(RuntimeError, match="unsafe to autocast"):
            _under_autocast(ours, device_type, dtype)(*inputs)
        return
    # assert_parity checks output dtype, values and the dtype/values of every input gradient
    assert_parity(_under_autocast(ours, device_type, dtype), _under_autocast(stock, device_type, dtype), inputs, None, **tolerance(dtype))


def _mlp(layers):
    return torch.nn.Sequential(layers.Linear(6, 8), layers.GELU(), layers.Linear(8, 8), layers.Tanh(), layers.Linear(8, 3))


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward_outside", "backward_inside"])
@pytest.mark.parametrize("device_type,dtype", AUTOCAST)
def test_autocast_training_step(device_type, dtype, backward_inside):
    """A whole step: fp32 parameters, low-precision matmuls, fp32 gradients, as stock autocast."""
    torch.manual_seed(0)
    stock = _mlp(torch.nn).to(device_type)
    ours = _mlp(mnn).to(device_type)
    ours.load_state_dict(stock.state_dict())
    x, y = torch.randn(16, 6, device=device_type), torch.randint(0, 3, (16,), device=device_type)
    losses = []
    for model, F in ((stock, TF), (ours, MF)):
        with torch.autocast(device_type, dtype=dtype):
            out = model(x)
            loss = F.cross_entropy(out, y)
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        losses.append((out, loss))
    (out_s, loss_s), (out_o, loss_o) = losses
    assert out_o.dtype == out_s.dtype == dtype and loss_o.dtype == loss_s.dtype == torch.float32
    assert type(out_o.grad_fn).__name__ == "LinearBackward"
    torch.testing.assert_close(out_o, out_s, **tolerance(dtype))
    for (name, p_o), p_s in zip(ours.named_parameters(), stock.parameters()):
        assert p_o.grad.dtype == torch.float32, name
        torch.testing.assert_close(p_o.grad, p_s.grad, **tolerance(dtype), msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------- torch.func


def _per_sample_setup(device):
    torch.manual_seed(0)
    stock = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Sigmoid(), torch.nn.Linear(4, 3))
    ours = torch.nn.Sequential(mnn.Linear(5, 4), mnn.Sigmoid(), mnn.Linear(4, 3))
    ours.load_state_dict(stock.state_dict())
    return stock.to(device), ours.to(device), torch.randn(6, 5, device=device), torch.randint(0, 3, (6,), device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_func_grad_and_vmap_per_sample_gradients(device):
    """The per-sample-gradient recipe from the torch.func docs, on our rules."""
    from torch.func import functional_call, grad, vmap

    stock, ours, x, y = _per_sample_setup(device)

    def per_sample(model, F):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    got, expected = per_sample(ours, MF), per_sample(stock, TF)
    for name in expected:
        assert got[name].shape == (6, *dict(stock.named_parameters())[name].shape)
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ACTIVATIONS, ids=repr)
def test_vmap_of_each_activation_rule_and_its_gradient(rule):
    from torch.func import grad, vmap

    z = torch.randn(5, 4)
    torch.testing.assert_close(vmap(rule.ours)(z), vmap(rule.stock)(z))
    scalar = lambda f: lambda zi: (f(zi) * torch.arange(4.0)).sum()  # noqa: E731
    torch.testing.assert_close(vmap(grad(scalar(rule.ours)))(z), vmap(grad(scalar(rule.stock)))(z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", [l for l in LOSSES if l.name.endswith("_none") or "weight" in l.name], ids=repr)
def test_vmap_of_each_loss_rule_and_its_gradient(loss):
    from torch.func import grad, vmap

    z, y = loss.make(4, "cpu", torch.float32, torch.Generator().manual_seed(0))
    total = lambda f: lambda zi, yi: f(zi.unsqueeze(0), yi.unsqueeze(0)).sum()  # noqa: E731
    torch.testing.assert_close(vmap(grad(total(loss.ours)))(z, y), vmap(grad(total(loss.stock)))(z, y), rtol=1e-5, atol=1e-6)


def test_func_jacrev_of_linear():
    from torch.func import jacrev

    a, W, b = torch.randn(3, 4), torch.randn(2, 4), torch.randn(2)
    torch.testing.assert_close(jacrev(MF.linear, argnums=1)(a, W, b), jacrev(TF.linear, argnums=1)(a, W, b))


# ------------------------------------------------------------ torch.compile


def _compile_case(backend, device):
    torch.manual_seed(0)
    stock = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 3), torch.nn.Softmax(dim=1))
    ours = torch.nn.Sequential(mnn.Linear(5, 8), mnn.ReLU(), mnn.Linear(8, 8), mnn.Sigmoid(), mnn.Linear(8, 3), mnn.Softmax(dim=1))
    ours.load_state_dict(stock.state_dict())
    stock, ours = stock.to(device), ours.to(device)
    compiled = torch.compile(ours, backend=backend, fullgraph=True)
    x = torch.randn(7, 5, device=device)
    target = torch.rand(7, 3, device=device)
    for model, F in ((stock, TF), (compiled, MF)):
        F.mse_loss(model(x), target).backward()
    for (name, p_o), p_s in zip(ours.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p_o.grad, p_s.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_compile_aot_eager_same_gradients(device):
    """aot_eager traces our forward and backward into graphs: no graph breaks allowed (fullgraph)."""
    _compile_case("aot_eager", device)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor_same_gradients(device):
    _compile_case("inductor", device)


def test_compiled_rule_is_ours():
    """Under compile our backward is what runs: a wrong σ' would show in the gradient."""
    from manual_backprop.rules import Sigmoid

    original = Sigmoid.backward
    try:
        Sigmoid.backward = staticmethod(lambda ctx, delta: (delta * 0,))
        torch._dynamo.reset()
        z = torch.randn(4, requires_grad=True)
        torch.compile(MF.sigmoid, backend="aot_eager")(z).sum().backward()
        assert not z.grad.any()
    finally:
        Sigmoid.backward = original
        torch._dynamo.reset()
