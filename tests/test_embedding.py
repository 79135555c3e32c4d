"""Embedding: z = E[x], ∂J/∂E[i] = Σ of δ over the positions that looked up row i, against torch's embedding."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import manual_backprop as mb
import manual_backprop.functional as MF
import manual_backprop.nn as mnn
from manual_backprop.rules.embedding import embedding_weight_grad
from tests.cases import DEVICES, FLOAT32, FLOAT64, assert_parity, leaf

CONFIGS = [
    {},
    dict(padding_idx=1),
    dict(padding_idx=-2),
    dict(scale_grad_by_freq=True),
    dict(padding_idx=0, scale_grad_by_freq=True),
    dict(max_norm=1.0),
    dict(max_norm=0.5, norm_type=1.0),
]
SHAPES = [(0,), (6,), (3, 4), (2, 3, 4)]


def make(shape, device, dtype, num=5, dim=3, index_dtype=torch.int64):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, num, shape, generator=g).to(device=device, dtype=index_dtype)
    if x.numel():
        x.view(-1)[0] = x.view(-1)[-1]  # some row is looked up more than once
    return [x, torch.randn(num, dim, dtype=dtype, generator=g).to(device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_parity(config, shape, dtype, device):
    tol = FLOAT64 if dtype == torch.float64 else FLOAT32
    assert_parity(partial(MF.embedding, **config), partial(TF.embedding, **config), make(shape, device, dtype),
                  "EmbeddingBackward", **tol)


def test_int32_indices():
    x, E = make((3, 4), "cpu", torch.float32, index_dtype=torch.int32)
    assert_parity(MF.embedding, TF.embedding, [x, E], "EmbeddingBackward", **FLOAT32)


def test_max_norm_renormalises_the_weight_in_place_like_torch():
    x, E = make((3, 4), "cpu", torch.float64)
    ours, stock = E.clone() * 3, E.clone() * 3
    MF.embedding(x, ours, max_norm=1.0)
    TF.embedding(x, stock, max_norm=1.0)
    torch.testing.assert_close(ours, stock, **FLOAT64)
    assert not torch.equal(ours, E * 3)


@pytest.mark.parametrize("shape", [(4,), (2, 3)])
def test_gradcheck_and_gradgradcheck(shape):
    x, E = make(shape, "cpu", torch.float64)
    E.requires_grad_()
    assert torch.autograd.gradcheck(partial(MF.embedding, x), [E])
    assert torch.autograd.gradgradcheck(partial(MF.embedding, x), [E])
    # padding_idx and scale_grad_by_freq are not the derivative of the lookup (as in torch): second order only
    assert torch.autograd.gradgradcheck(partial(MF.embedding, x, padding_idx=1, scale_grad_by_freq=True), [E])


def test_weight_gradient_is_delta_added_into_the_rows_looked_up():
    """∂J/∂E[i] = Σ_{n : x[n] = i} δₙ, written out position by position."""
    x = torch.tensor([[0, 2, 2], [4, 2, 1]])
    delta = torch.randn(2, 3, 4, dtype=torch.float64)
    expected = torch.zeros(5, 4, dtype=torch.float64)
    for n in range(2):
        for t in range(3):
            expected[x[n, t]] += delta[n, t]
    torch.testing.assert_close(embedding_weight_grad(delta, x, 5), expected)
    expected[2] = 0
    torch.testing.assert_close(embedding_weight_grad(delta, x, 5, padding_idx=2), expected)
    E = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(MF.embedding(x, E), [E], delta)
    torch.testing.assert_close(grad, embedding_weight_grad(delta, x, 5))


def test_scale_grad_by_freq_divides_by_the_count():
    x = torch.tensor([3, 3, 3, 1])
    delta = torch.ones(4, 2)
    grad = embedding_weight_grad(delta, x, 4, scale_grad_by_freq=True)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))


def test_sparse_is_refused_and_convert_leaves_it_stock():
    x, E = make((3,), "cpu", torch.float32)
    with pytest.raises(mb.InputError, match="sparse=True"):
        MF.embedding(x, E.requires_grad_(), sparse=True)
    report = mb.report(mb.convert(nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Embedding(5, 3))))
    assert report.row("0").status == "stock" and "sparse=True" in report.row("0").reason
    assert report.row("1").status == "manual"


@pytest.mark.parametrize("bad,error", [(torch.tensor([0, 5]), IndexError), (torch.tensor([-1]), IndexError),
                                       (torch.tensor([0.0]), RuntimeError)])
def test_bad_indices_raise_like_torch(bad, error):
    E = torch.randn(5, 3)
    with pytest.raises(error):
        TF.embedding(bad, E)
    with pytest.raises(error):
        MF.embedding(bad, E)


def test_padding_idx_out_of_range():
    with pytest.raises(mb.InputError, match="padding_idx"):
        MF.embedding(torch.tensor([0]), torch.randn(5, 3), padding_idx=5)


@given(lead=st.lists(st.integers(0, 3), min_size=0, max_size=3), num=st.integers(1, 6), dim=st.integers(1, 4),
       padding=st.booleans(), freq=st.booleans())
def test_parity_hypothesis_shapes(lead, num, dim, padding, freq):
    inputs = make(tuple(lead), "cpu", torch.float64, num=num, dim=dim)
    config = dict(padding_idx=0 if padding else None, scale_grad_by_freq=freq)
    assert_parity(partial(MF.embedding, **config), partial(TF.embedding, **config), inputs, "EmbeddingBackward", **FLOAT64)


def test_autocast_keeps_the_weight_dtype_like_torch():
    x, E = make((3, 4), "cpu", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, stock = MF.embedding(x, E), TF.embedding(x, E)
    assert ours.dtype == stock.dtype == torch.float32


def test_torch_compile_fullgraph():
    x, E = make((3, 4), "cpu", torch.float32)
    compiled = torch.compile(partial(MF.embedding, padding_idx=1), backend="aot_eager", fullgraph=True)
    ours, stock = leaf(E), leaf(E)
    out = compiled(x, ours)
    torch.testing.assert_close(out, TF.embedding(x, stock, padding_idx=1))
    out.square().sum().backward()
    TF.embedding(x, stock, padding_idx=1).square().sum().backward()
    torch.testing.assert_close(ours.grad, stock.grad, **FLOAT32)


def test_vmap_of_grad():
    """Per-sample weight gradients: one sequence of indices per sample."""
    x = torch.randint(0, 5, (4, 3))
    E = torch.randn(5, 2, dtype=torch.float64)

    def loss(fn, E, x):
        return fn(x, E).square().sum()

    ours = torch.func.vmap(torch.func.grad(partial(loss, MF.embedding)), in_dims=(None, 0))(E, x)
    stock = torch.func.vmap(torch.func.grad(partial(loss, TF.embedding)), in_dims=(None, 0))(E, x)
    torch.testing.assert_close(ours, stock, **FLOAT64)


@pytest.mark.parametrize("device", DEVICES)
def test_module_converts_with_stock_gradients(device):
    torch.manual_seed(0)
    stock = nn.Embedding(6, 4, padding_idx=2, device=device)
    ours = mb.convert(stock)
    assert type(ours) is mnn.Embedding and repr(ours) == repr(stock)
    x = torch.tensor([[0, 2, 5], [2, 2, 1]], device=device)
    ours(x).square().sum().backward()
    stock(x).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, stock.weight.grad, **FLOAT32)
    assert not ours.weight.grad[2].any()
    assert type(mb.restore(ours)) is nn.Embedding
