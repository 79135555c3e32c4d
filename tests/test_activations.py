"""Activation rules: a = σ(z), backward δ ⊙ σ'; softmax's Jacobian-vector product."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from manual_backprop import rules
from manual_backprop.rules._native import python_rule
from tests.cases import ACTIVATION_SHAPES, ACTIVATIONS, DEVICES, FLOAT32, INPLACE, assert_parity


def sample(shape, activation, device, dtype=torch.float32):
    low, high = activation.domain
    return torch.empty(shape, dtype=dtype).uniform_(low, high).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ACTIVATION_SHAPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=repr)
def test_parity(activation, shape, device):
    z = sample(shape, activation, device)
    assert_parity(activation.ours, activation.stock, [z], activation.grad_fn, **FLOAT32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=repr)
def test_parity_non_contiguous(activation, device):
    z = sample((5, 4, 3), activation, device).transpose(0, 2)
    assert not z.is_contiguous()
    assert_parity(activation.ours, activation.stock, [z], activation.grad_fn, **FLOAT32)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=repr)
def test_gradcheck_and_gradgradcheck(activation):
    # Keep away from relu's kink at 0 where finite differences are meaningless.
    z = sample((3, 4), activation, "cpu", torch.float64)
    z = torch.where(z.abs() < 0.1, z + 0.3, z).requires_grad_()
    assert torch.autograd.gradcheck(activation.ours, (z,))
    assert torch.autograd.gradgradcheck(activation.ours, (z,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", INPLACE, ids=repr)
def test_inplace(activation, device):
    """inplace=True overwrites its input, as torch does, and still backpropagates with our σ'."""

    def through_a_layer(fn):
        def run(x, w):
            z = x * w  # a non-leaf, so it may be modified in place
            out = fn(z)
            assert out is z  # the input itself was overwritten
            return out

        return run

    x, w = sample((4, 5), activation, device), sample((4, 5), activation, device)
    assert_parity(through_a_layer(activation.ours), through_a_layer(activation.stock), [x, w], activation.grad_fn, **FLOAT32)


@pytest.mark.parametrize("activation", INPLACE, ids=repr)
def test_inplace_gradcheck(activation):
    z = sample((3, 4), activation, "cpu", torch.float64)
    z = torch.where(z.abs() < 0.1, z + 0.3, z).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: activation.ours(t.clone()), (z,))
    assert torch.autograd.gradgradcheck(lambda t: activation.ours(t.clone()), (z,))


def test_sigma_prime_from_the_saved_output():
    """sigmoid, tanh and relu keep only their output a, as the notes' σ' = a(1 − a) needs."""
    from manual_backprop import functional as MF

    z = torch.randn(3, requires_grad=True)
    for fn in (MF.sigmoid, MF.tanh, MF.relu):
        with python_rule():  # what the Python rules save (their native twins' nodes have no saved_tensors)
            a = fn(z)
        (saved,) = a.grad_fn.saved_tensors
        assert torch.equal(saved, a)


@given(
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    index=st.integers(0, len(ACTIVATIONS) - 1),
)
def test_parity_hypothesis_shapes(shape, index):
    activation = ACTIVATIONS[index]
    z = sample(tuple(shape), activation, "cpu")
    assert_parity(activation.ours, activation.stock, [z], activation.grad_fn, **FLOAT32)


RULES_WITH_PARAMS = [
    (rules.Sigmoid, ()), (rules.Tanh, ()), (rules.ReLU, ()), (rules.Identity, ()), (rules.LeakyReLU, (0.2,)),
    (rules.ELU, (0.7,)), (rules.Softplus, (2.0, 1.0)), (rules.SiLU, ()), (rules.GELU, ("none",)), (rules.GELU, ("tanh",)),
]


@pytest.mark.parametrize("rule,params", RULES_WITH_PARAMS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_fast_delta_sigma_prime_is_delta_times_the_notes_sigma_prime(rule, params):
    """Each rule's σ' is written once as the notes write it; the backward's δ ⊙ σ' must equal it."""
    z = torch.randn(64, dtype=torch.float64) * 3
    a = rule.sigma(z, *params)
    saved = {"a": a, "z": z, None: None}[rule.sigma_prime_from]
    delta = torch.randn(64, dtype=torch.float64)
    expected = delta * rule.sigma_prime(saved, *params)
    torch.testing.assert_close(rule.delta_sigma_prime(delta, saved, *params), expected, rtol=1e-12, atol=1e-14)


# ------------------------------------------------ norm branch: the activations CNNs use

RULES_WITH_PARAMS_CNN = [
    (rules.ReLU6, ()), (rules.Hardtanh, (-1.0, 1.0)), (rules.Hardtanh, (-2.0, 0.5)), (rules.Hardsigmoid, ()),
    (rules.Hardswish, ()), (rules.Mish, ()),
]


@pytest.mark.parametrize("rule,params", RULES_WITH_PARAMS_CNN, ids=lambda v: getattr(v, "__name__", str(v)))
def test_fast_delta_sigma_prime_of_cnn_activations(rule, params):
    test_fast_delta_sigma_prime_is_delta_times_the_notes_sigma_prime(rule, params)


KINKS = torch.tensor([-3.0, -2.0, -1.0, 0.0, 0.5, 1.0, 3.0, 6.0, -3.5, 7.0], dtype=torch.float64)


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a.name in ("relu6", "hardtanh", "hardtanh_-2_0.5", "hardsigmoid", "hardswish")], ids=repr)
def test_sigma_prime_at_the_kinks_is_torchs(activation):
    """At z = ±3, 0, 6, ±1 (where σ' jumps) our σ' picks the same side as torch's."""
    assert_parity(activation.ours, activation.stock, [KINKS], activation.grad_fn, rtol=0, atol=0)


def _prelu_inputs(shape, num_parameters, device, dtype=torch.float32):
    z = torch.randn(shape, dtype=dtype, device=device)
    z.view(-1)[::5] = 0.0  # z = 0 gets the slope α (as torch)
    return [z, torch.rand(num_parameters, dtype=dtype, device=device) * 0.5]


PRELU_CASES = [((4, 3), 1), ((4, 3), 3), ((2, 3, 5), 3), ((2, 3, 4, 4), 3), ((2, 3, 4, 4), 1), ((7,), 1), ((0, 3), 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape,num_parameters", PRELU_CASES, ids=str)
def test_prelu_parity_input_and_weight_gradients(shape, num_parameters, dtype, device):
    from manual_backprop import functional as MF
    from tests.cases import tolerance

    assert_parity(MF.prelu, torch.nn.functional.prelu, _prelu_inputs(shape, num_parameters, device, dtype), "PReLUBackward", **tolerance(dtype))


@pytest.mark.parametrize("num_parameters", [1, 3])
def test_prelu_gradcheck_and_gradgradcheck(num_parameters):
    from manual_backprop import functional as MF

    z, w = _prelu_inputs((2, 3, 2), num_parameters, "cpu", torch.float64)
    z = torch.where(z.abs() < 0.1, z + 0.3, z)  # off the kink for finite differences
    assert torch.autograd.gradcheck(MF.prelu, (z.requires_grad_(), w.requires_grad_()))
    assert torch.autograd.gradgradcheck(MF.prelu, (z, w))


def test_prelu_weight_gradient_is_sum_of_delta_times_negative_part():
    """∂J/∂α_c = Σ δ·min(z, 0) over every dim but the channel, written out channel by channel."""
    from manual_backprop.rules.activations import prelu_weight_grad

    z, w = _prelu_inputs((2, 3, 4), 3, "cpu", torch.float64)
    delta = torch.randn(2, 3, 4, dtype=torch.float64)
    expected = torch.stack([(delta[:, c] * z[:, c].clamp(max=0)).sum() for c in range(3)])
    torch.testing.assert_close(prelu_weight_grad(delta, z, w), expected)
    torch.testing.assert_close(prelu_weight_grad(delta, z, w[:1]), expected.sum().reshape(1))


def test_prelu_autocast_cpu_runs_in_bfloat16_as_torch():
    from manual_backprop import functional as MF

    z, w = _prelu_inputs((4, 3, 5), 3, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_parity(MF.prelu, torch.nn.functional.prelu, [z, w], None, rtol=2e-2, atol=2e-2)


def test_prelu_vmap_grad():
    from torch.func import grad, vmap

    from manual_backprop import functional as MF

    z, w = _prelu_inputs((5, 3, 4), 3, "cpu")
    loss = lambda f: lambda w, zi: (f(zi.unsqueeze(0), w) ** 2).sum()  # noqa: E731
    got = vmap(grad(loss(MF.prelu)), in_dims=(None, 0))(w, z)
    expected = vmap(grad(loss(torch.nn.functional.prelu)), in_dims=(None, 0))(w, z)
    torch.testing.assert_close(got, expected)


def test_prelu_wrong_number_of_slopes_raises_as_torch():
    from manual_backprop import functional as MF

    z, w = torch.randn(2, 3), torch.ones(4)
    with pytest.raises(RuntimeError) as stock:
        torch.nn.functional.prelu(z, w)
    with pytest.raises(RuntimeError, match="Mismatch of parameter numbers") as ours:
        MF.prelu(z, w)
    assert str(ours.value) == str(stock.value)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=repr)
def test_compile_aot_eager_fullgraph_each_activation(activation):
    """Every rule traces without a graph break, forward and backward (the default δ ⊙ σ' too)."""
    torch._dynamo.reset()
    z = sample((4, 5), activation, "cpu").requires_grad_()
    compiled = torch.compile(activation.ours, backend="aot_eager", fullgraph=True)
    (got,) = torch.autograd.grad((compiled(z) * torch.arange(5.0)).sum(), z)
    (expected,) = torch.autograd.grad((activation.stock(z) * torch.arange(5.0)).sum(), z)
    torch.testing.assert_close(got, expected)


# ------------------------------------------------ per-layer overhead: fewer ops, same rounding


@pytest.mark.parametrize("rule", [rules.Sigmoid, rules.Tanh])
def test_delta_sigma_prime_rounds_as_torch_in_saturation(rule):
    """δ ⊙ σ' from a float32 a, against the same product in float64: sigmoid's (1 − a) is exact, so its
    error stays a few ulp of the result however close a is to 1; tanh's δ − (δa)·a, like torch's
    δ(1 − a²), stays within a few ulp of δ."""
    z = torch.linspace(-12, 12, 2001)
    a = rule.sigma(z)
    delta = torch.empty_like(z).uniform_(0.5, 2)
    got = rule.delta_sigma_prime(delta, a).double()
    exact = delta.double() * rule.sigma_prime(a.double())
    eps = torch.finfo(torch.float32).eps
    bound = 4 * eps * (exact.abs() if rule is rules.Sigmoid else delta.double().abs())
    assert ((got - exact).abs() <= bound).all()
