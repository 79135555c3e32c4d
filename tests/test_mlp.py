"""MLP: the whole network as one rule, compared with the stock nn.Sequential it replaces."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF

import manual_backprop.functional as MF
import manual_backprop.nn as mnn
from manual_backprop import rules
from manual_backprop._checks import InputError
from tests.cases import DEVICES, FUSED_MLP, LOW_PRECISION, node_name, tolerance

# (id, MLP's activation argument, the stock module it stands for). Settings other than
# the defaults are given as modules, the way a user copies them from a Sequential.
ACTIVATIONS = [
    ("sigmoid", "sigmoid", nn.Sigmoid),
    ("tanh", "tanh", nn.Tanh),
    ("relu", "relu", nn.ReLU),
    ("leaky_relu_0.2", nn.LeakyReLU(0.2), lambda: nn.LeakyReLU(0.2)),
    ("elu_alpha_0.5", nn.ELU(alpha=0.5), lambda: nn.ELU(alpha=0.5)),
    ("softplus_beta2_thr1", nn.Softplus(beta=2.0, threshold=1.0), lambda: nn.Softplus(beta=2.0, threshold=1.0)),
    ("silu", "silu", nn.SiLU),
    ("gelu", "gelu", nn.GELU),
    ("gelu_tanh", nn.GELU(approximate="tanh"), lambda: nn.GELU(approximate="tanh")),
    ("identity", "identity", nn.Identity),
]
ACTIVATIONS += [  # norm branch: the activations CNNs use
    ("relu6", "relu6", nn.ReLU6),
    ("hardtanh_-2_0.5", nn.Hardtanh(-2.0, 0.5), lambda: nn.Hardtanh(-2.0, 0.5)),
    ("hardsigmoid", "hardsigmoid", nn.Hardsigmoid),
    ("hardswish", "hardswish", nn.Hardswish),
    ("mish", "mish", nn.Mish),
]
ACTIVATION_IDS = [a[0] for a in ACTIVATIONS]

# (id, our loss, stock loss, target maker for (batch, outputs)). The network ends in logits.
LOSSES = [
    ("mse", MF.mse_loss, TF.mse_loss, lambda n, k, dtype: torch.randn(n, k, dtype=dtype)),
    ("bce_logits", MF.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits,
     lambda n, k, dtype: torch.randint(0, 2, (n, k)).to(dtype)),
    ("cross_entropy", MF.cross_entropy, TF.cross_entropy, lambda n, k, dtype: torch.randint(0, k, (n,))),
]

SIZES = [3, 5, 4, 3]


def pair(sizes, activation, stock_activation, output_activation=None, bias=True, device="cpu", dtype=torch.float32):
    """Our MLP and the stock Sequential it stands for, with equal parameters."""
    mlp = mnn.MLP(sizes, activation, output_activation=output_activation, bias=bias, device=device, dtype=dtype)
    layers: list[nn.Module] = []
    for k, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(n_in, n_out, bias=bias, device=device, dtype=dtype))
        if k < len(sizes) - 2:
            layers.append(stock_activation())
    if output_activation is not None:
        layers.append(output_activation)
    stock = nn.Sequential(*layers)
    mlp.load_sequential_state_dict(stock.state_dict())
    return mlp, stock


def grads(model, x, loss_fn, target):
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    loss = loss_fn(out, target)
    params = list(model.parameters())
    g = torch.autograd.grad(loss, [x] + params)
    return out, loss, g


def assert_same_step(mlp, stock, x, ours_loss, stock_loss, target, tol):
    out, loss, g = grads(mlp, x, ours_loss, target)
    out_s, loss_s, g_s = grads(stock, x, stock_loss, target)
    assert node_name(out.grad_fn) in FUSED_MLP, f"our fused rule did not run: {out.grad_fn}"
    assert out.dtype == out_s.dtype and out.shape == out_s.shape
    torch.testing.assert_close(out, out_s, **tol)
    torch.testing.assert_close(loss, loss_s, **tol)
    names = ["input"] + [n for n, _ in stock.named_parameters()]
    for name, a, b in zip(names, g, g_s):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"gradient of {name}: {m}")


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("loss", LOSSES, ids=[loss[0] for loss in LOSSES])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_parity_with_stock_sequential(activation, loss, dtype, device):
    _, ours_act, stock_act = activation
    _, ours_loss, stock_loss, make_target = loss
    mlp, stock = pair(SIZES, ours_act, stock_act, device=device, dtype=dtype)
    x = torch.randn(6, SIZES[0], dtype=dtype, device=device) * 2
    target = make_target(6, SIZES[-1], dtype).to(device)
    assert_same_step(mlp, stock, x, ours_loss, stock_loss, target, tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "gelu"])
def test_parity_bfloat16(activation, device):
    stock_act = dict((a[0], a[2]) for a in ACTIVATIONS)[activation]
    mlp, stock = pair(SIZES, activation, stock_act, device=device, dtype=torch.bfloat16)
    x = torch.randn(6, SIZES[0], dtype=torch.bfloat16, device=device)
    target = torch.randn(6, SIZES[-1], dtype=torch.bfloat16, device=device)
    # Our backward rounds σ' and δ to bfloat16 in other places than torch's fused kernels.
    assert_same_step(mlp, stock, x, MF.mse_loss, TF.mse_loss, target, dict(rtol=5e-2, atol=5e-2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("output_activation", [nn.Sigmoid(), nn.Tanh(), nn.GELU(), nn.Softplus(beta=2.0)],
                         ids=["sigmoid", "tanh", "gelu", "softplus"])
def test_output_activation(output_activation, device):
    mlp, stock = pair(SIZES, "tanh", nn.Tanh, output_activation=output_activation, device=device, dtype=torch.float64)
    x = torch.randn(6, SIZES[0], dtype=torch.float64, device=device)
    target = torch.rand(6, SIZES[-1], dtype=torch.float64, device=device)
    assert_same_step(mlp, stock, x, MF.mse_loss, TF.mse_loss, target, tolerance(torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 3), (2, 1, 2, 3), (3,), (0, 3), (2, 0, 3)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_shapes_and_bias(shape, bias, device):
    mlp, stock = pair(SIZES, "sigmoid", nn.Sigmoid, bias=bias, device=device, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    target = torch.randn(shape[:-1] + (SIZES[-1],), dtype=torch.float64, device=device)
    reduction = "sum"  # "mean" of an empty batch is nan in both
    assert_same_step(mlp, stock, x, lambda o, t: MF.mse_loss(o, t, reduction=reduction),
                     lambda o, t: TF.mse_loss(o, t, reduction=reduction), target, tolerance(torch.float64))
    assert any("bias" in name for name, _ in mlp.named_parameters()) == bias


@pytest.mark.parametrize("device", DEVICES)
def test_single_layer_and_deep(device):
    for sizes in ([3, 2], [3, 4, 4, 4, 4, 2]):
        mlp, stock = pair(sizes, "tanh", nn.Tanh, device=device, dtype=torch.float64)
        x = torch.randn(5, 3, dtype=torch.float64, device=device)
        target = torch.randn(5, sizes[-1], dtype=torch.float64, device=device)
        assert_same_step(mlp, stock, x, MF.mse_loss, TF.mse_loss, target, tolerance(torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_only_the_gradients_asked_for(device):
    """Frozen layers get no gradient, and the rule keeps nothing for them; an input that wants one gets it."""
    mlp, stock = pair(SIZES, "sigmoid", nn.Sigmoid, device=device, dtype=torch.float64)
    for model in (mlp, stock):
        for p in list(model.parameters())[:2]:  # freeze the first Linear
            p.requires_grad_(False)
    x = torch.randn(4, SIZES[0], dtype=torch.float64, device=device)
    target = torch.randn(4, SIZES[-1], dtype=torch.float64, device=device)
    MF.mse_loss(mlp(x), target).backward()
    TF.mse_loss(stock(x), target).backward()
    ours, theirs = list(mlp.parameters()), list(stock.parameters())
    assert ours[0].grad is None and ours[1].grad is None
    for a, b in zip(ours[2:], theirs[2:]):
        torch.testing.assert_close(a.grad, b.grad)
    # δ stops at layer 1: neither x nor W(0), W(1) is kept (only W(2), a(1), a(2)).
    kept = sum(n for _, n in saved_storages(lambda: mlp(x)))
    assert kept == (SIZES[3] * SIZES[2] + 4 * SIZES[1] + 4 * SIZES[2]) * 8
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(mlp(x).sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(stock(x).sum(), x)[0])


def test_frozen_network_and_no_grad():
    mlp = mnn.MLP([3, 4, 2], "sigmoid").requires_grad_(False)
    x = torch.randn(5, 3)
    out = mlp(x)
    assert out.grad_fn is None
    with torch.no_grad():
        torch.testing.assert_close(mnn.MLP.from_sequential(mlp.to_sequential())(x), out)
    x.requires_grad_()
    (grad,) = torch.autograd.grad(mlp(x).sum(), x)
    expected = torch.autograd.grad(mlp.to_sequential()(x).sum(), x)[0]
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_incoming_gradient_is_not_modified(device):
    mlp, _ = pair(SIZES, "sigmoid", nn.Sigmoid, output_activation=nn.Sigmoid(), device=device)
    out = mlp(torch.randn(4, SIZES[0], device=device))
    upstream = torch.randn_like(out)
    kept = upstream.clone()
    torch.autograd.grad(out, list(mlp.parameters()), upstream)
    assert torch.equal(upstream, kept)


# ------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_gradcheck_and_gradgradcheck(activation, device):
    _, ours_act, stock_act = activation
    mlp, _ = pair([3, 4, 3, 2], ours_act, stock_act, output_activation=nn.Sigmoid(), device=device, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_() for p in mlp.parameters()]
    names = [n for n, _ in mlp.named_parameters()]
    x = (torch.randn(2, 2, 3, dtype=torch.float64, device=device) + 0.1).requires_grad_()

    def network(x, *params):
        return torch.func.functional_call(mlp, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(network, (x, *params))
    assert torch.autograd.gradgradcheck(network, (x, *params))


def test_gradgradcheck_z_saving_output_activation():
    """σ' from z on the last layer: z is an extra output, double backward must reach it."""
    mlp = mnn.MLP([3, 4, 2], "elu", output_activation="silu", dtype=torch.float64)
    params = [p.detach().clone().requires_grad_() for p in mlp.parameters()]
    names = [n for n, _ in mlp.named_parameters()]
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    network = lambda x, *p: torch.func.functional_call(mlp, dict(zip(names, p)), (x,))  # noqa: E731
    assert torch.autograd.gradgradcheck(network, (x, *params))


# ------------------------------------------------------------------ saved tensors


def saved_storages(fn) -> set:
    storages = set()

    def pack(t):
        storages.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_saves_no_more_than_stock(activation):
    _, ours_act, stock_act = activation
    mlp, stock = pair([8, 16, 16, 4], ours_act, stock_act)
    x = torch.randn(32, 8)
    ours = sum(n for _, n in saved_storages(lambda: mlp(x)))
    theirs = sum(n for _, n in saved_storages(lambda: stock(x)))
    assert ours <= theirs
    if activation[0] in ("sigmoid", "tanh", "relu", "identity"):  # σ' from a: x, W(1), W(2), a(1), a(2)
        weights = (16 * 16 + 4 * 16) * 4  # not W(0): it would only carry δ to x, which needs no gradient
        assert ours == weights + (32 * 8 + 2 * 32 * 16) * 4


# ------------------------------------------------------------------ state_dict and Sequential


def test_same_seed_same_initial_parameters_as_sequential():
    torch.manual_seed(1)
    mlp = mnn.MLP([4, 6, 2], "tanh")
    torch.manual_seed(1)
    stock = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    for a, b in zip(mlp.parameters(), stock.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_from_sequential_to_sequential_round_trip(device):
    stock = nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(0.3), nn.Linear(6, 5), nn.LeakyReLU(0.3), nn.Linear(5, 2),
                          nn.Sigmoid()).to(device, torch.float64)
    mlp = mnn.MLP.from_sequential(stock)
    assert mlp.sizes == [4, 6, 5, 2] and mlp.activation.negative_slope == 0.3
    assert isinstance(mlp.output_activation, nn.Sigmoid)
    x = torch.randn(3, 4, device=device, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), stock(x))
    back = mlp.to_sequential()
    assert [type(m) for m in back] == [type(m) for m in stock]
    assert back.state_dict().keys() == stock.state_dict().keys()
    for key, value in stock.state_dict().items():
        assert torch.equal(back.state_dict()[key], value) and back.state_dict()[key].device == value.device
    torch.testing.assert_close(back(x), stock(x))


def test_load_sequential_state_dict_of_our_modules_and_with_dropout():
    ours = nn.Sequential(mnn.Linear(3, 4), mnn.ReLU(), nn.Dropout(0.0), mnn.Linear(4, 2))
    mlp = mnn.MLP([3, 4, 2], "relu")
    result = mlp.load_sequential_state_dict(ours.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(5, 3)
    torch.testing.assert_close(mlp(x), ours(x))
    assert mlp.sequential_state_dict().keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_load_sequential_state_dict_mismatch_names_the_layers():
    mlp = mnn.MLP([3, 4, 4, 2])
    with pytest.raises(InputError, match="2 weighted layers"):
        mlp.load_sequential_state_dict(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        mnn.MLP([3, 5, 2]).load_sequential_state_dict(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict())


def test_state_dict_round_trip_and_weights_only_load(tmp_path):
    mlp = mnn.MLP([3, 4, 2], nn.LeakyReLU(0.2), bias=False)
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    other = mnn.MLP([3, 4, 2], nn.LeakyReLU(0.2), bias=False)
    other.load_state_dict(torch.load(tmp_path / "mlp.pt", weights_only=True))
    x = torch.randn(2, 3)
    torch.testing.assert_close(other(x), mlp(x))
    assert list(mlp.state_dict()) == ["layers.0.weight", "layers.1.weight"]


@pytest.mark.parametrize(
    "sequential, message",
    [
        (nn.Sequential(nn.ReLU(), nn.Linear(3, 2)), "expected Linear"),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), "hidden activations differ"),
        (nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), "expected Linear"),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False)), "bias"),
        (nn.Sequential(nn.Linear(3, 4), nn.Softmax(-1), nn.Linear(4, 2)), "activation must be one of"),
    ],
    ids=["starts_with_activation", "mixed_activations", "no_activation", "mixed_bias", "softmax"],
)
def test_from_sequential_rejects_what_it_cannot_represent(sequential, message):
    with pytest.raises(InputError, match=message):
        mnn.MLP.from_sequential(sequential)


def test_activation_given_as_name_rule_or_module():
    for activation in ("leaky_relu", rules.LeakyReLU, nn.LeakyReLU(), mnn.LeakyReLU()):
        assert type(mnn.MLP([2, 2, 1], activation).activation) is nn.LeakyReLU
    assert mnn.MLP([2, 2, 1], mnn.LeakyReLU(0.4)).activation.negative_slope == 0.4


def test_bad_arguments_are_named():
    with pytest.raises(InputError, match="'swish'"):
        mnn.MLP([2, 3], "swish")
    with pytest.raises(InputError, match=r"\[2\]"):
        mnn.MLP([2])
    with pytest.raises(InputError, match=r"sizes\[0\]=3.*\(4, 2\)"):
        mnn.MLP([3, 2])(torch.randn(4, 2))
    with pytest.raises(InputError, match="output_activation|activation must be one of"):
        mnn.MLP([3, 2], output_activation=nn.Softmax(-1))
    with pytest.raises(InputError, match="dtype"):
        mnn.MLP([3, 2])(torch.randn(4, 3, dtype=torch.float64))


def test_deepcopy_and_pickle_keep_the_fused_rule():
    mlp = mnn.MLP([3, 4, 2], nn.ELU(alpha=0.5))
    x = torch.randn(2, 3)
    for other in (copy.deepcopy(mlp), pickle.loads(pickle.dumps(mlp))):
        out = other(x)
        assert node_name(out.grad_fn) in FUSED_MLP
        torch.testing.assert_close(out, mlp(x))


def test_repr_shows_the_configuration():
    text = repr(mnn.MLP([4, 8, 2], "tanh", output_activation="sigmoid", bias=False))
    assert "sizes=[4, 8, 2], activation=Tanh(), output_activation=Sigmoid(), bias=False" in text
    assert "Linear(in_features=4, out_features=8, bias=False)" in text


# ------------------------------------------------------------------ torch.func, autocast, compile


@pytest.mark.parametrize("device", DEVICES)
def test_torch_func_grad_and_vmap(device):
    mlp, stock = pair(SIZES, "gelu", nn.GELU, device=device, dtype=torch.float64)
    params = dict(mlp.named_parameters())
    x = torch.randn(5, SIZES[0], dtype=torch.float64, device=device)
    y = torch.randn(5, SIZES[-1], dtype=torch.float64, device=device)

    def loss(params, x, y):
        out = torch.func.functional_call(mlp, params, (x,))
        return MF.mse_loss(out, y)

    grad = torch.func.grad(loss)(params, x, y)
    expected = torch.autograd.grad(TF.mse_loss(stock(x), y), list(stock.parameters()))
    for a, b in zip(grad.values(), expected):
        torch.testing.assert_close(a, b)

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(5):
        one = torch.autograd.grad(TF.mse_loss(stock(x[i]), y[i]), list(stock.parameters()))
        for a, b in zip(per_sample.values(), one):
            torch.testing.assert_close(a[i], b)

    outputs = torch.func.vmap(mlp)(x.unsqueeze(1))
    torch.testing.assert_close(outputs, stock(x).unsqueeze(1))


def test_autocast_bfloat16_like_stock_sequential():
    mlp, stock = pair(SIZES, "relu", nn.ReLU, output_activation=nn.Sigmoid())
    x = torch.randn(6, SIZES[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_s = mlp(x), stock(x)
        assert node_name(out.grad_fn) in FUSED_MLP
        assert out.dtype == out_s.dtype == torch.bfloat16
        torch.testing.assert_close(out, out_s, **LOW_PRECISION[torch.bfloat16])
        g = torch.autograd.grad(out.float().sum(), list(mlp.parameters()))
        g_s = torch.autograd.grad(out_s.float().sum(), list(stock.parameters()))
    for a, b, p in zip(g, g_s, mlp.parameters()):
        assert a.dtype == p.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def _compiled_matches_eager(backend):
    mlp = mnn.MLP([3, 5, 2], "tanh")
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    MF.mse_loss(mlp(x), y).backward()
    eager = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: MF.mse_loss(mlp(x), y), backend=backend, fullgraph=True)
    compiled(x, y).backward()
    for a, b in zip(eager, (p.grad for p in mlp.parameters())):
        torch.testing.assert_close(a, b)


def test_compile_aot_eager_same_gradients():
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_compile_inductor_same_gradients():
    _compiled_matches_eager("inductor")
