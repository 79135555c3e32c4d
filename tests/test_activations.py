"""Activation rules: a = σ(z), backward δ ⊙ σ'; softmax's Jacobian-vector product."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from manual_backprop import rules
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
