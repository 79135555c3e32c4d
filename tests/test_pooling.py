"""Max, average and adaptive pooling rules against torch.nn.functional."""

from functools import partial

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import manual_backprop as mb
import manual_backprop.functional as MF
import manual_backprop.nn as mnn
from manual_backprop.rules.pooling import route_to_argmax
from tests.cases import DEVICES, FLOAT32, FLOAT64, LOW_PRECISION, POOL_CASES, assert_parity, leaf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", POOL_CASES, ids=repr)
def test_parity_float32(case, device):
    assert_parity(case.call(case.ours), case.call(case.stock), case.make(device), case.grad_fn, **FLOAT32)


@pytest.mark.parametrize("case", POOL_CASES, ids=repr)
def test_parity_float64(case):
    assert_parity(case.call(case.ours), case.call(case.stock), case.make(dtype=torch.float64), case.grad_fn, **FLOAT64)


@pytest.mark.parametrize("case", POOL_CASES, ids=repr)
def test_gradcheck_and_gradgradcheck(case):
    inputs = [t.requires_grad_() for t in case.make(dtype=torch.float64)]
    fast = inputs[0].numel() > 0  # torch's fast mode cannot take an empty batch
    assert torch.autograd.gradcheck(case.call(case.ours), inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(case.call(case.ours), inputs, fast_mode=fast)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c in POOL_CASES if "max" in c.name], ids=repr)
def test_return_indices_equal_torch(case, device):
    x = case.make(device)[0]
    z, indices = case.ours(leaf(x), **case.kwargs, return_indices=True)
    z_stock, indices_stock = case.stock(x, **case.kwargs, return_indices=True)
    torch.testing.assert_close(z, z_stock)
    assert torch.equal(indices, indices_stock) and not indices.requires_grad


def test_max_pool_routes_delta_to_argmax_and_adds_overlaps():
    """A maximum shared by overlapping windows collects the δ of each of them."""
    a = torch.zeros(1, 1, 3, 3)
    a[0, 0, 1, 1] = 5.0  # the maximum of all four 2×2 windows (stride 1)
    a.requires_grad_()
    z = MF.max_pool2d(a, 2, stride=1)
    delta = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    (grad,) = torch.autograd.grad(z, [a], delta)
    expected = torch.zeros(1, 1, 3, 3)
    expected[0, 0, 1, 1] = 10.0
    torch.testing.assert_close(grad, expected)
    _, indices = TF.max_pool2d(a, 2, stride=1, return_indices=True)
    torch.testing.assert_close(route_to_argmax(delta, indices, a.shape, 2), expected)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 2),
    size=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 1), st.integers(0, 1)),
    ceil_mode=st.booleans(),
    kind=st.sampled_from(["max", "avg", "avg_exclude"]),
)
def test_parity_hypothesis_shapes(n, size, kernel, stride, padding, ceil_mode, kind):
    assume(all(2 * p <= k for p, k in zip(padding, kernel)))  # torch: pad at most half the kernel
    assume(all(s + 2 * p >= k for s, p, k in zip(size, padding, kernel)))
    kwargs = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode)
    if kind == "max":
        ours, stock, grad_fn = MF.max_pool2d, TF.max_pool2d, "MaxPoolBackward"
    else:
        ours, stock, grad_fn = MF.avg_pool2d, TF.avg_pool2d, "AvgPoolBackward"
        kwargs["count_include_pad"] = kind == "avg"
    assert_parity(partial(ours, **kwargs), partial(stock, **kwargs), [torch.randn(n, 2, *size)], grad_fn, **FLOAT32)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 2), size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       out=st.tuples(st.integers(1, 5), st.integers(1, 5)), kind=st.sampled_from(["avg", "max"]))
def test_adaptive_parity_hypothesis_shapes(n, size, out, kind):
    ours, stock = (MF.adaptive_avg_pool2d, TF.adaptive_avg_pool2d) if kind == "avg" else (MF.adaptive_max_pool2d, TF.adaptive_max_pool2d)
    assert_parity(partial(ours, output_size=out), partial(stock, output_size=out), [torch.randn(n, 3, *size)], None, **FLOAT32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,kwargs", [("max_pool2d", dict(kernel_size=3, stride=2, padding=1)),
                                         ("avg_pool2d", dict(kernel_size=2)),
                                         ("adaptive_avg_pool2d", dict(output_size=1)),
                                         ("adaptive_max_pool2d", dict(output_size=2))])
def test_channels_last(name, kwargs, device):
    x = torch.randn(2, 4, 6, 6, device=device).to(memory_format=torch.channels_last)
    ours, stock = partial(getattr(MF, name), **kwargs), partial(getattr(TF, name), **kwargs)
    out_ours, out_stock = ours(x), stock(x)
    assert out_ours.is_contiguous(memory_format=torch.channels_last) == out_stock.is_contiguous(memory_format=torch.channels_last)
    assert_parity(ours, stock, [x], None, **FLOAT32)


@pytest.mark.parametrize("name,kwargs", [("max_pool2d", dict(kernel_size=2)), ("max_pool3d", dict(kernel_size=2)),
                                         ("avg_pool2d", dict(kernel_size=2)), ("avg_pool3d", dict(kernel_size=2)),
                                         ("adaptive_avg_pool3d", dict(output_size=1)),
                                         ("adaptive_max_pool3d", dict(output_size=1))])
def test_autocast_cpu_bfloat16_dtypes_as_torch(name, kwargs):
    """Under autocast the 3-d pools run in float32 on CPU (autocast_mode.cpp), the 2-d ones in the input dtype."""
    x = torch.randn(2, 3, 4, 4, 4 if "3d" in name else 1, dtype=torch.bfloat16)[..., 0] if "2d" in name else torch.randn(2, 3, 4, 4, 4, dtype=torch.bfloat16)
    ours, stock = leaf(x), leaf(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_ours, z_stock = getattr(MF, name)(ours, **kwargs), getattr(TF, name)(stock, **kwargs)
    assert z_ours.dtype == z_stock.dtype
    torch.testing.assert_close(z_ours, z_stock, **LOW_PRECISION[torch.bfloat16])
    (g_ours,), (g_stock,) = torch.autograd.grad(z_ours.sum(), [ours]), torch.autograd.grad(z_stock.sum(), [stock])
    assert g_ours.dtype == g_stock.dtype == torch.bfloat16
    torch.testing.assert_close(g_ours, g_stock, **LOW_PRECISION[torch.bfloat16])


def test_torch_compile_fullgraph():
    def net(x):
        z = MF.max_pool2d(x, 3, stride=2, padding=1) + MF.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
        return (MF.adaptive_avg_pool2d(z, 2) * MF.adaptive_max_pool2d(z, 2)).sum()

    x = torch.randn(2, 3, 7, 7)
    xe, xc = leaf(x), leaf(x)
    (expected,) = torch.autograd.grad(net(xe), [xe])
    (got,) = torch.autograd.grad(torch.compile(net, backend="aot_eager", fullgraph=True)(xc), [xc])
    torch.testing.assert_close(got, expected, **FLOAT32)


def test_vmap_of_grad():
    x = torch.randn(4, 3, 6, 6)

    def loss(pool, x):
        return pool(x).square().sum()

    for ours, stock in [(partial(MF.max_pool2d, kernel_size=2), partial(TF.max_pool2d, kernel_size=2)),
                        (partial(MF.avg_pool2d, kernel_size=3, padding=1), partial(TF.avg_pool2d, kernel_size=3, padding=1)),
                        (partial(MF.adaptive_avg_pool2d, output_size=2), partial(TF.adaptive_avg_pool2d, output_size=2))]:
        got = torch.func.vmap(torch.func.grad(partial(loss, ours)))(x)
        torch.testing.assert_close(got, torch.func.vmap(torch.func.grad(partial(loss, stock)))(x), **FLOAT32)


def test_bad_input_same_errors_as_torch():
    for ours, stock, args in [(MF.max_pool2d, TF.max_pool2d, (torch.randn(1, 2, 4, 4), 2, 2, 2)),  # pad > kernel/2
                              (MF.avg_pool2d, TF.avg_pool2d, (torch.randn(1, 2, 4, 4), 5)),  # output size 0
                              (MF.max_pool2d, TF.max_pool2d, (torch.randn(4, 4), 2))]:  # 2-D input
        with pytest.raises(RuntimeError):
            stock(*args)
        with pytest.raises(RuntimeError):
            ours(*args)


@pytest.mark.parametrize("return_indices", [False, True])
def test_modules_and_routing(return_indices):
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    stock = torch.nn.Sequential(torch.nn.MaxPool2d(2, return_indices=return_indices))
    ours = mb.convert(stock)
    assert type(ours[0]) is mnn.MaxPool2d
    out_ours, out_stock = ours(x), stock(x)
    if return_indices:
        assert torch.equal(out_ours[1], out_stock[1])
        out_ours, out_stock = out_ours[0], out_stock[0]
    assert type(out_ours.grad_fn).__name__ == "MaxPoolBackward"
    torch.testing.assert_close(out_ours, out_stock)
    with mb.manual_functions() as calls:
        routed = stock(x)
        TF.avg_pool2d(x, 2), TF.adaptive_avg_pool2d(x, 1), TF.adaptive_max_pool2d(x, 1, return_indices=True)
        torch.max_pool2d(x, 2), torch.avg_pool1d(x[0], 2), torch.adaptive_max_pool1d(x[0], 2)
    routed = routed[0] if return_indices else routed
    assert type(routed.grad_fn).__name__ == "MaxPoolBackward"
    assert calls.routed == {"max_pool2d": 2, "avg_pool2d": 1, "adaptive_avg_pool2d": 1, "adaptive_max_pool2d": 1,
                            "avg_pool1d": 1, "adaptive_max_pool1d": 1}
