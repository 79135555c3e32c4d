"""Loss rules: the output error δ(L) against torch's losses."""

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given
from hypothesis import strategies as st

import manual_backprop.functional as MF
from tests.cases import DEVICES, FLOAT32, LOSSES, assert_parity


def make(loss, batch, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return list(loss.make(batch, device, dtype, g))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [0, 1, 6])
@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_parity(loss, batch, device):
    assert_parity(loss.ours, loss.stock, make(loss, batch, device), loss.grad_fn, **FLOAT32)


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_gradcheck_and_gradgradcheck(loss):
    inputs = make(loss, 4, "cpu", torch.float64)
    inputs = [t.requires_grad_(t.is_floating_point() and (i == 0 or loss.target_grad)) for i, t in enumerate(inputs)]
    assert torch.autograd.gradcheck(loss.ours, inputs)
    assert torch.autograd.gradgradcheck(loss.ours, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    z = torch.randn(4, 6, device=device).t()  # (6, 4), strided
    y = torch.randint(0, 4, (6,), device=device)
    assert_parity(MF.cross_entropy, TF.cross_entropy, [z, y], "CrossEntropyBackward", **FLOAT32)
    p = torch.rand(3, 6, device=device).t()
    t = torch.rand(6, 3, device=device)
    for ours, stock in [(MF.mse_loss, TF.mse_loss), (MF.binary_cross_entropy, TF.binary_cross_entropy)]:
        assert_parity(ours, stock, [p, t], None, **FLOAT32)


EXTREME = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0], [-1e4, -1e4, -1e4]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "ours,stock,target",
    [
        (MF.cross_entropy, TF.cross_entropy, torch.tensor([1, 0, 2])),
        (MF.cross_entropy, TF.cross_entropy, torch.softmax(torch.randn(3, 3), 1)),
        (MF.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])),
    ],
    ids=["ce_index", "ce_soft", "bce_logits"],
)
def test_logits_of_1e4_stay_finite_like_torch(ours, stock, target, device):
    z = EXTREME.to(device)
    assert_parity(ours, stock, [z, target.to(device)], None, **FLOAT32)
    loss = ours(z.clone().requires_grad_(), target.to(device))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("device", DEVICES)
def test_bce_at_saturated_probabilities_like_torch(device):
    """torch clamps log at −100 and the backward denominator at 1e−12; so do we."""
    p = torch.tensor([0.0, 1.0, 1e-30, 1 - 1e-7], device=device)
    y = torch.tensor([1.0, 0.0, 1.0, 1.0], device=device)
    assert_parity(MF.binary_cross_entropy, TF.binary_cross_entropy, [p, y], "BinaryCrossEntropyBackward", **FLOAT32)


def test_ce_all_targets_ignored_is_nan_like_torch():
    z = torch.randn(3, 4, requires_grad=True)
    y = torch.full((3,), -100)
    assert MF.cross_entropy(z, y).isnan() and TF.cross_entropy(z, y).isnan()


def test_ce_probability_targets_refuse_ignore_index_like_torch():
    z, p = torch.randn(3, 4), torch.softmax(torch.randn(3, 4), 1)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        TF.cross_entropy(z, p, ignore_index=1)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        MF.cross_entropy(z, p, ignore_index=1)
    MF.cross_entropy(z, p, ignore_index=-100)  # the default is accepted, as by torch


def test_ce_minus_inf_logit_elsewhere_is_finite_like_torch():
    z = torch.tensor([[0.0, float("-inf"), 1.0]], requires_grad=True)
    y = torch.tensor([2])
    assert_parity(MF.cross_entropy, TF.cross_entropy, [z, y], "CrossEntropyBackward", **FLOAT32)


def test_delta_is_prediction_minus_target():
    """The notes' δ(L) = ŷ − y: softmax + CE and sigmoid + BCE-with-logits, sum reduction."""
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (5,))
    (delta,) = torch.autograd.grad(MF.cross_entropy(z, y, reduction="sum"), z)
    torch.testing.assert_close(delta, torch.softmax(z, 1) - TF.one_hot(y, 3).double())
    t = torch.randint(0, 2, (5, 3)).double()
    (delta,) = torch.autograd.grad(MF.binary_cross_entropy_with_logits(z, t, reduction="sum"), z)
    torch.testing.assert_close(delta, torch.sigmoid(z) - t)
    (delta,) = torch.autograd.grad(MF.mse_loss(z, t, reduction="sum"), z)
    torch.testing.assert_close(delta, 2 * (z - t))


def test_legacy_size_average_and_reduce_as_torch():
    z, y = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.warns(UserWarning):
        ours = MF.mse_loss(z, y, size_average=False)
    with pytest.warns(UserWarning):
        stock = TF.mse_loss(z, y, size_average=False)
    torch.testing.assert_close(ours, stock)


def test_mse_warns_about_broadcasting_like_torch():
    with pytest.warns(UserWarning, match="different to the input size"):
        MF.mse_loss(torch.randn(3, 1), torch.randn(3))


@given(
    batch=st.integers(0, 5),
    extra=st.lists(st.integers(1, 3), max_size=2),
    classes=st.integers(1, 5),
    smoothing=st.sampled_from([0.0, 0.25]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_cross_entropy_hypothesis_shapes(batch, extra, classes, smoothing, reduction):
    z = torch.randn(batch, classes, *extra)
    y = torch.randint(0, classes, (batch, *extra))
    kwargs = dict(label_smoothing=smoothing, reduction=reduction)
    assert_parity(lambda a, b: MF.cross_entropy(a, b, **kwargs), lambda a, b: TF.cross_entropy(a, b, **kwargs), [z, y], "CrossEntropyBackward", **FLOAT32)


@given(shape=st.lists(st.integers(0, 4), min_size=1, max_size=4), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_elementwise_losses_hypothesis_shapes(shape, reduction):
    p, y = torch.rand(shape) * 0.9 + 0.05, torch.rand(shape)
    for ours, stock in [(MF.mse_loss, TF.mse_loss), (MF.binary_cross_entropy, TF.binary_cross_entropy), (MF.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits)]:
        assert_parity(lambda a, b: ours(a, b, reduction=reduction), lambda a, b: stock(a, b, reduction=reduction), [p, y], None, **FLOAT32)
