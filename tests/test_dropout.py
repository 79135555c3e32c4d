"""Dropout rules: a = z ⊙ m / (1 − p) with the mask drawn in forward; δ_z = δ ⊙ m / (1 − p)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as TF

import manual_backprop as mb
import manual_backprop.functional as MF
import manual_backprop.nn as mnn
from tests.cases import DEVICES

# (name, ours, stock, input shape, mask shape): every functional form torch has
DROPOUTS = [
    ("dropout", MF.dropout, TF.dropout, (6, 7), (6, 7)),
    ("dropout_4d", MF.dropout, TF.dropout, (2, 3, 4, 5), (2, 3, 4, 5)),
    ("dropout1d", MF.dropout1d, TF.dropout1d, (3, 4, 5), (3, 4, 1)),
    ("dropout1d_unbatched", MF.dropout1d, TF.dropout1d, (4, 5), (4, 1)),
    ("dropout2d", MF.dropout2d, TF.dropout2d, (3, 4, 2, 5), (3, 4, 1, 1)),
    ("dropout3d", MF.dropout3d, TF.dropout3d, (2, 4, 2, 2, 3), (2, 4, 1, 1, 1)),
    ("dropout3d_unbatched", MF.dropout3d, TF.dropout3d, (4, 2, 2, 3), (4, 1, 1, 1)),
]
IDS = [d[0] for d in DROPOUTS]


def _seeded(fn, seed=0):
    def run(*args, **kwargs):
        torch.manual_seed(seed)
        return fn(*args, **kwargs)

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("name,ours,stock,shape,mask_shape", DROPOUTS, ids=IDS)
def test_same_seed_same_mask_and_gradient_as_torch_on_cpu(name, ours, stock, shape, mask_shape, p, dtype):
    """torch's CPU kernel draws bernoulli_(1 − p) on the mask's shape; we draw the same, so a seed
    reproduces its output and gradient exactly (not just in distribution)."""
    z = torch.randn(shape, dtype=dtype)
    z_ours, z_stock = z.clone().requires_grad_(), z.clone().requires_grad_()
    out_ours, out_stock = _seeded(ours)(z_ours, p), _seeded(stock)(z_stock, p)
    assert type(out_ours.grad_fn).__name__ == "DropoutBackward"
    assert torch.equal(out_ours, out_stock)
    upstream = torch.randn(shape, dtype=dtype)
    (g_ours,), (g_stock,) = torch.autograd.grad(out_ours, z_ours, upstream), torch.autograd.grad(out_stock, z_stock, upstream)
    assert torch.equal(g_ours, g_stock)



def test_non_contiguous_input_gets_torchs_mask():
    """torch draws into empty_like(input), which keeps a transposed input's strides (attention outputs
    in batch_first layers are such views); drawing in the mask's contiguous order gave another mask."""
    z = torch.randn(4, 3, 8).transpose(0, 1)
    assert not z.is_contiguous()
    assert torch.equal(_seeded(MF.dropout)(z, 0.3), _seeded(TF.dropout)(z, 0.3))

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,ours,stock,shape,mask_shape", DROPOUTS, ids=IDS)
def test_saves_only_a_compact_mask_and_delta_is_masked_and_scaled(name, ours, stock, shape, mask_shape, device):
    p = 0.3
    z = (torch.rand(shape, device=device) + 0.5).requires_grad_()  # never 0: the output shows the mask
    out = ours(z, p)
    (mask,) = out.grad_fn.saved_tensors
    assert mask.dtype == torch.bool and tuple(mask.shape) == mask_shape  # one byte per element (or per channel)
    torch.testing.assert_close(out, z * mask / (1 - p))
    assert torch.equal(out != 0, mask.expand(shape))
    delta = torch.randn(shape, device=device)
    (grad,) = torch.autograd.grad(out, z, delta)
    torch.testing.assert_close(grad, delta * mask / (1 - p))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_mask_statistics(p, device):
    """Elements dropped with probability p (binomial: within 5 standard deviations); E[a] = z."""
    n = 200_000
    z = torch.ones(n, device=device, requires_grad=True)
    out = MF.dropout(z, p)
    kept = (out != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert abs(out.mean().item() - 1) < 5 * (p / (1 - p) / n) ** 0.5
    channels = MF.dropout2d(torch.ones(400, 250, 2, 2, device=device, requires_grad=True), p)
    per_channel = channels.flatten(2)
    assert (per_channel == per_channel[..., :1]).all()  # a channel is kept or dropped whole
    assert abs((per_channel[..., 0] != 0).double().mean().item() - (1 - p)) < 5 * (p * (1 - p) / 100_000) ** 0.5


@pytest.mark.parametrize("name,ours,stock,shape,mask_shape", DROPOUTS, ids=IDS)
def test_eval_and_p_zero_return_the_input_itself(name, ours, stock, shape, mask_shape):
    z = torch.randn(shape, requires_grad=True)
    assert ours(z, 0.5, training=False) is z  # no graph node at all, as stock F.dropout
    assert ours(z, 0.0) is z
    assert ours(torch.empty(0, *shape[1:]), 0.5).numel() == 0


@pytest.mark.parametrize("name,ours,stock,shape,mask_shape", DROPOUTS, ids=IDS)
def test_p_one_zeroes_everything_and_its_gradient(name, ours, stock, shape, mask_shape):
    z = torch.randn(shape, requires_grad=True)
    state = torch.get_rng_state()
    out = ours(z, 1.0)
    assert torch.equal(torch.get_rng_state(), state)  # torch draws nothing for p = 1; nor do we
    assert not out.any()
    (grad,) = torch.autograd.grad(out.sum(), z)
    assert not grad.any()
    torch.testing.assert_close(out, stock(z, 1.0))


@pytest.mark.parametrize("name,ours,stock,shape,mask_shape", DROPOUTS, ids=IDS)
def test_inplace_overwrites_its_input_as_torch(name, ours, stock, shape, mask_shape):
    x = torch.randn(shape)
    w_ours, w_stock = torch.ones(shape, requires_grad=True), torch.ones(shape, requires_grad=True)
    z_ours, z_stock = x * w_ours, x * w_stock  # non-leaves, so they may be modified in place
    out_ours, out_stock = _seeded(ours)(z_ours, 0.4, inplace=True), _seeded(stock)(z_stock, 0.4, inplace=True)
    assert out_ours is z_ours and type(out_ours.grad_fn).__name__ == "InplaceDropoutBackward"
    assert torch.equal(out_ours, out_stock)
    out_ours.sum().backward(), out_stock.sum().backward()
    assert torch.equal(w_ours.grad, w_stock.grad)


@pytest.mark.parametrize("inplace", [False, True])
def test_gradcheck_and_gradgradcheck(inplace):
    z = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    for fn in (MF.dropout, MF.dropout2d):
        seeded = _seeded(lambda t: fn(t.clone() if inplace else t, 0.3, inplace=inplace))  # same mask on every call
        assert torch.autograd.gradcheck(seeded, (z,))
        assert torch.autograd.gradgradcheck(seeded, (z,))


def test_bad_input_raises_as_torch():
    for call in (
        lambda F: F.dropout(torch.randn(3), 1.5),
        lambda F: F.dropout2d(torch.randn(3, 4, 5, 6), -0.1),
        lambda F: F.dropout1d(torch.randn(2, 3, 4, 5), 0.5),
    ):
        with pytest.raises((ValueError, RuntimeError)) as stock:
            call(TF)
        with pytest.raises(type(stock.value)) as ours:
            call(MF)
        assert str(ours.value) == str(stock.value)


def test_dropout2d_warns_as_torch_on_3d_input():
    for F in (TF, MF):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            F.dropout2d(torch.randn(2, 3, 4), 0.5)
        assert any("Received a 3D input to dropout2d" in str(w.message) for w in caught), F


# ------------------------------------------------------------------ modules, convert, compile, routes

MODULES = [(mnn.Dropout, torch.nn.Dropout, (4, 6)), (mnn.Dropout1d, torch.nn.Dropout1d, (3, 4, 5)), (mnn.Dropout2d, torch.nn.Dropout2d, (3, 4, 2, 2)), (mnn.Dropout3d, torch.nn.Dropout3d, (2, 4, 2, 2, 2))]


@pytest.mark.parametrize("ours_cls,stock_cls,shape", MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_modules_drop_in_and_match_torch(ours_cls, stock_cls, shape):
    ours, stock = ours_cls(0.3), stock_cls(0.3)
    assert isinstance(ours, stock_cls) and repr(ours) == repr(stock)
    assert inspect.signature(ours_cls.__init__) == inspect.signature(stock_cls.__init__)
    assert {k for k, v in vars(ours_cls).items() if callable(v) and not k.startswith("__")} == {"forward"}
    z = torch.randn(shape, requires_grad=True)
    assert torch.equal(_seeded(ours)(z), _seeded(stock)(z))
    assert type(ours(z).grad_fn).__name__ == "DropoutBackward"
    ours.eval()
    assert ours(z) is z  # eval: identity, no node (convert must not add nodes for it)


def test_converted_model_in_eval_adds_no_dropout_nodes():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5), torch.nn.Dropout2d(0.2))
    converted = mb.convert(model).eval()
    x = torch.randn(2, 3)
    out = converted(x)
    assert type(out.grad_fn).__name__ == "LinearBackward"  # straight from Linear: dropout added nothing


@pytest.mark.parametrize("device", DEVICES)
def test_compile_aot_eager_fullgraph(device):
    """Compiled, the mask is still drawn from the global RNG (on CPU: torch's eager draw, exactly),
    and the gradient is δ ⊙ m / (1 − p) of that mask."""
    drop = torch.compile(lambda z: MF.dropout(z, 0.4), backend="aot_eager", fullgraph=True)
    z = (torch.rand(6, 7, device=device) + 0.5).requires_grad_()
    out = _seeded(drop)(z)
    mask = out.detach() != 0
    delta = torch.randn_like(z)
    (grad,) = torch.autograd.grad(out, z, delta)
    torch.testing.assert_close(grad, delta * mask / 0.6)
    if device == "cpu":
        assert torch.equal(out, _seeded(TF.dropout)(z, 0.4))


def test_manual_functions_routes_dropout():
    z = torch.randn(4, 5, 3, requires_grad=True)
    with mb.manual_functions() as mode:
        outs = [_seeded(TF.dropout)(z, 0.3), _seeded(TF.dropout2d)(z, 0.3), _seeded(torch.dropout)(z, 0.3, True)]
    assert all(type(o.grad_fn).__name__ == "DropoutBackward" for o in outs)
    assert mode.routed["dropout"] == 2 and mode.routed["dropout2d"] == 1
    assert torch.equal(outs[0], _seeded(TF.dropout)(z, 0.3))
