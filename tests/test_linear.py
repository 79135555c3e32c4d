"""Linear rule: z = a Wᵀ + b against torch.nn.functional.linear."""

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given
from hypothesis import strategies as st

import manual_backprop.functional as MF
from manual_backprop.rules._native import python_rule
from tests.cases import DEVICES, FLOAT32, LINEAR_SHAPES, assert_parity


def make(shape, in_features, out_features, bias, device, dtype=torch.float32):
    a = torch.randn(shape, dtype=dtype, device=device)
    W = torch.randn(out_features, in_features, dtype=dtype, device=device)
    b = torch.randn(out_features, dtype=dtype, device=device) if bias else None
    return [a, W] + ([b] if bias else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape,in_features,out_features", LINEAR_SHAPES)
def test_parity(shape, in_features, out_features, bias, device):
    inputs = make(shape, in_features, out_features, bias, device)
    assert_parity(MF.linear, TF.linear, inputs, "LinearBackward", **FLOAT32)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input_and_weight(device):
    a = torch.randn(6, 5, 4, device=device).transpose(0, 2)  # (4, 5, 6), strided
    W = torch.randn(6, 3, device=device).t()  # (3, 6), transposed
    assert not a.is_contiguous() and not W.is_contiguous()
    assert_parity(MF.linear, TF.linear, [a, W, torch.randn(3, device=device)], "LinearBackward", **FLOAT32)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4), (0, 4)])
def test_gradcheck_and_gradgradcheck(shape, bias):
    inputs = [t.requires_grad_() for t in make(shape, 4, 3, bias, "cpu", torch.float64)]
    assert torch.autograd.gradcheck(MF.linear, inputs)
    assert torch.autograd.gradgradcheck(MF.linear, inputs)


def test_computes_only_requested_gradients():
    a, W, b = make((4, 5), 5, 3, True, "cpu")
    W.requires_grad_()
    with python_rule():  # what the Python rule saves (its native twin's node has no saved_tensors)
        out = MF.linear(a, W, b)
    # ∂J/∂a is not asked for, so W (needed only for δ W) is not saved; a is (for ∂J/∂W).
    saved_a, saved_W = out.grad_fn.saved_tensors
    assert saved_W is None and saved_a is not None
    (gW,) = torch.autograd.grad(out.sum(), [W])
    torch.testing.assert_close(gW, torch.ones(4, 3).t() @ a)


def test_weight_gradient_is_sum_of_outer_products():
    """∂J/∂W = Σₙ δₙ aₙᵀ, written out sample by sample as in the notes."""
    a, W, b = make((3, 4), 4, 2, True, "cpu", torch.float64)
    W.requires_grad_()
    delta = torch.randn(3, 2, dtype=torch.float64)
    (gW,) = torch.autograd.grad(MF.linear(a, W, b), [W], delta)
    outer_sum = sum(torch.outer(delta[n], a[n]) for n in range(3))
    torch.testing.assert_close(gW, outer_sum)


@given(
    lead=st.lists(st.integers(0, 3), min_size=0, max_size=3),
    in_features=st.integers(1, 6),
    out_features=st.integers(1, 6),
    bias=st.booleans(),
)
def test_parity_hypothesis_shapes(lead, in_features, out_features, bias):
    inputs = make((*lead, in_features), in_features, out_features, bias, "cpu")
    assert_parity(MF.linear, TF.linear, inputs, "LinearBackward", **FLOAT32)
