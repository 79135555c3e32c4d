"""Case tables shared by the tests: each rule next to the stock torch op it must equal.

A case is data: our function, the stock function, how to make its inputs, and the
grad_fn name that proves our rule ran. Tests expand the tables over devices,
dtypes and shapes, and compare forward values and every gradient with autograd.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import pytest
import torch
import torch.nn.functional as TF

import manual_backprop.functional as MF

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device"))]

# Forward and every gradient must match stock in float32 to this (the issue asks for 1e-5 or tighter).
FLOAT32 = dict(rtol=1e-5, atol=1e-5)
FLOAT64 = dict(rtol=1e-10, atol=1e-12)
# Low precision: both sides round differently in intermediate steps; one or two ulps of the dtype.
LOW_PRECISION = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def tolerance(dtype: torch.dtype) -> dict:
    return {torch.float64: FLOAT64, torch.float32: FLOAT32}.get(dtype) or LOW_PRECISION[dtype]


# ------------------------------------------------------------ activations


@dataclass(frozen=True)
class Activation:
    name: str
    ours: Callable
    stock: Callable
    grad_fn: str
    # (low, high) for random inputs: keep away from kinks where finite differences lie.
    domain: tuple[float, float] = (-3.0, 3.0)

    def __repr__(self) -> str:  # readable test ids
        return self.name


ACTIVATIONS = [
    Activation("sigmoid", MF.sigmoid, TF.sigmoid, "SigmoidBackward"),
    Activation("tanh", MF.tanh, TF.tanh, "TanhBackward"),
    Activation("relu", MF.relu, TF.relu, "ReLUBackward"),
    Activation("leaky_relu", MF.leaky_relu, TF.leaky_relu, "LeakyReLUBackward"),
    Activation("leaky_relu_0.2", partial(MF.leaky_relu, negative_slope=0.2), partial(TF.leaky_relu, negative_slope=0.2), "LeakyReLUBackward"),
    Activation("elu", MF.elu, TF.elu, "ELUBackward"),
    Activation("elu_alpha_0.5", partial(MF.elu, alpha=0.5), partial(TF.elu, alpha=0.5), "ELUBackward"),
    Activation("softplus", MF.softplus, TF.softplus, "SoftplusBackward"),
    Activation("softplus_beta2_thr1", partial(MF.softplus, beta=2.0, threshold=1.0), partial(TF.softplus, beta=2.0, threshold=1.0), "SoftplusBackward"),
    Activation("silu", MF.silu, TF.silu, "SiLUBackward"),
    Activation("gelu", MF.gelu, TF.gelu, "GELUBackward"),
    Activation("gelu_tanh", partial(MF.gelu, approximate="tanh"), partial(TF.gelu, approximate="tanh"), "GELUBackward"),
    Activation("identity", MF.identity, lambda z: z.view_as(z), "IdentityBackward"),
    Activation("softmax_last", partial(MF.softmax, dim=-1), partial(TF.softmax, dim=-1), "SoftmaxBackward"),
    Activation("softmax_first", partial(MF.softmax, dim=0), partial(TF.softmax, dim=0), "SoftmaxBackward"),
]

# The ones with an `inplace` argument in torch.nn.functional.
INPLACE = [
    Activation("relu_", partial(MF.relu, inplace=True), partial(TF.relu, inplace=True), "InplaceElementwiseBackward"),
    Activation("leaky_relu_", partial(MF.leaky_relu, negative_slope=0.1, inplace=True), partial(TF.leaky_relu, negative_slope=0.1, inplace=True), "InplaceElementwiseBackward"),
    Activation("elu_", partial(MF.elu, inplace=True), partial(TF.elu, inplace=True), "InplaceElementwiseBackward"),
    Activation("silu_", partial(MF.silu, inplace=True), partial(TF.silu, inplace=True), "InplaceElementwiseBackward"),
]

# Shapes every elementwise rule must take: a batch of 0, 1-D, 2-D, 3-D and 4-D inputs.
ACTIVATION_SHAPES = [(0, 5), (7,), (4, 5), (2, 3, 5), (2, 3, 4, 5)]


# ------------------------------------------------------------------ linear

# (input shape, in_features, out_features): leading dimensions of any number, including none and 0.
LINEAR_SHAPES = [((5,), 5, 3), ((4, 5), 5, 3), ((0, 5), 5, 3), ((2, 3, 5), 5, 4), ((2, 3, 4, 5), 5, 2), ((1, 1), 1, 1)]


# ------------------------------------------------------------------ losses


@dataclass(frozen=True)
class Loss:
    name: str
    ours: Callable
    stock: Callable
    grad_fn: str
    make: Callable  # (batch, device, dtype, generator) -> (input, target); kwargs are bound in ours/stock
    target_grad: bool = False  # torch differentiates the target too

    def __repr__(self) -> str:
        return self.name


def _regression(n, device, dtype, g, shape=(3,)):
    return torch.randn(n, *shape, dtype=dtype, generator=g).to(device), torch.randn(n, *shape, dtype=dtype, generator=g).to(device)


def _probabilities(n, device, dtype, g):
    p = torch.rand(n, 3, dtype=dtype, generator=g) * 0.9 + 0.05
    return p.to(device), torch.rand(n, 3, dtype=dtype, generator=g).to(device)


def _logits_binary(n, device, dtype, g):
    z = torch.randn(n, 3, dtype=dtype, generator=g) * 3
    return z.to(device), torch.randint(0, 2, (n, 3), generator=g).to(dtype).to(device)


def _logits_classes(n, device, dtype, g, extra=(), ignore=False):
    z = torch.randn(n, 4, *extra, dtype=dtype, generator=g) * 2
    y = torch.randint(0, 4, (n, *extra), generator=g)
    if ignore and y.numel():
        y.view(-1)[:: 3] = -100
    return z.to(device), y.to(device)


def _logits_soft(n, device, dtype, g):
    z = torch.randn(n, 4, dtype=dtype, generator=g) * 2
    return z.to(device), torch.softmax(torch.randn(n, 4, dtype=dtype, generator=g), 1).to(device)


def _both(fn_ours, fn_stock, **kwargs):
    return partial(fn_ours, **kwargs), partial(fn_stock, **kwargs)


def _weighted(kind: str, size: int):
    """Class or element weights made inside the call, on the input's device and dtype."""

    def bind(fn):
        def call(input, target, **kwargs):
            w = torch.linspace(0.5, 2.0, max(size, 0), dtype=input.dtype, device=input.device)
            if size == -1:  # shaped like the input (mse_loss's weight)
                w = torch.linspace(0.5, 2.0, input.numel(), dtype=input.dtype, device=input.device).reshape(input.shape)
            return fn(input, target, **{kind: w}, **kwargs)

        return call

    return bind


LOSSES: list[Loss] = []
for reduction in ("mean", "sum", "none"):
    LOSSES += [
        Loss(f"mse_{reduction}", *_both(MF.mse_loss, TF.mse_loss, reduction=reduction), "MSELossBackward", _regression, True),
        Loss(f"bce_{reduction}", *_both(MF.binary_cross_entropy, TF.binary_cross_entropy, reduction=reduction), "BinaryCrossEntropyBackward", _probabilities, True),
        Loss(f"bce_logits_{reduction}", *_both(MF.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, reduction=reduction), "BinaryCrossEntropyWithLogitsBackward", _logits_binary, True),
        Loss(f"ce_{reduction}", *_both(MF.cross_entropy, TF.cross_entropy, reduction=reduction), "CrossEntropyBackward", _logits_classes),
        Loss(f"ce_ignore_smooth_{reduction}", *_both(MF.cross_entropy, TF.cross_entropy, reduction=reduction, label_smoothing=0.1), "CrossEntropyBackward", partial(_logits_classes, ignore=True)),
        Loss(f"ce_soft_{reduction}", *_both(MF.cross_entropy, TF.cross_entropy, reduction=reduction, label_smoothing=0.2), "CrossEntropyBackward", _logits_soft, True),
        Loss(f"ce_2d_{reduction}", *_both(MF.cross_entropy, TF.cross_entropy, reduction=reduction), "CrossEntropyBackward", partial(_logits_classes, extra=(2, 3), ignore=True)),
    ]
LOSSES += [
    Loss("mse_broadcast", MF.mse_loss, TF.mse_loss, "MSELossBackward", lambda n, d, t, g: (_regression(n, d, t, g, (3,))[0], torch.randn(3, dtype=t, generator=g).to(d)), True),
    Loss("mse_weight", _weighted("weight", -1)(MF.mse_loss), _weighted("weight", -1)(TF.mse_loss), "MSELossBackward", lambda n, d, t, g: _regression(n, d, t, g, (3,)), True),
    Loss("bce_weight", _weighted("weight", 3)(MF.binary_cross_entropy), _weighted("weight", 3)(TF.binary_cross_entropy), "BinaryCrossEntropyBackward", _probabilities, True),
    Loss("bce_logits_pos_weight", _weighted("pos_weight", 3)(MF.binary_cross_entropy_with_logits), _weighted("pos_weight", 3)(TF.binary_cross_entropy_with_logits), "BinaryCrossEntropyWithLogitsBackward", _logits_binary, True),
    Loss("bce_logits_weight", _weighted("weight", 3)(MF.binary_cross_entropy_with_logits), _weighted("weight", 3)(TF.binary_cross_entropy_with_logits), "BinaryCrossEntropyWithLogitsBackward", _logits_binary, True),
    Loss("ce_weight", _weighted("weight", 4)(MF.cross_entropy), _weighted("weight", 4)(TF.cross_entropy), "CrossEntropyBackward", partial(_logits_classes, ignore=True)),
    Loss("ce_weight_smooth", _weighted("weight", 4)(partial(MF.cross_entropy, label_smoothing=0.3)), _weighted("weight", 4)(partial(TF.cross_entropy, label_smoothing=0.3)), "CrossEntropyBackward", partial(_logits_classes, ignore=True)),
    Loss("ce_soft_weight", _weighted("weight", 4)(MF.cross_entropy), _weighted("weight", 4)(TF.cross_entropy), "CrossEntropyBackward", _logits_soft, True),
    Loss("ce_unbatched", MF.cross_entropy, TF.cross_entropy, "CrossEntropyBackward", lambda n, d, t, g: (torch.randn(4, dtype=t, generator=g).to(d), torch.tensor(2, device=d))),
]

# ---- weights under every reduction, and a non-default ignore_index (issue 14: mutants that survived a
# backward using the default ignore_index, and weighted MSE's backward under reduction "sum").
# The weighted cases above run with "mean"; these add "sum" and "none". ignore_index=1 is a real class
# that the random targets hit about one time in four.
for reduction in ("sum", "none"):
    LOSSES += [
        Loss(f"mse_weight_{reduction}", _weighted("weight", -1)(partial(MF.mse_loss, reduction=reduction)), _weighted("weight", -1)(partial(TF.mse_loss, reduction=reduction)), "MSELossBackward", lambda n, d, t, g: _regression(n, d, t, g, (3,)), True),
        Loss(f"bce_weight_{reduction}", _weighted("weight", 3)(partial(MF.binary_cross_entropy, reduction=reduction)), _weighted("weight", 3)(partial(TF.binary_cross_entropy, reduction=reduction)), "BinaryCrossEntropyBackward", _probabilities, True),
        Loss(f"bce_logits_weight_{reduction}", _weighted("weight", 3)(partial(MF.binary_cross_entropy_with_logits, reduction=reduction)), _weighted("weight", 3)(partial(TF.binary_cross_entropy_with_logits, reduction=reduction)), "BinaryCrossEntropyWithLogitsBackward", _logits_binary, True),
        Loss(f"bce_logits_pos_weight_{reduction}", _weighted("pos_weight", 3)(partial(MF.binary_cross_entropy_with_logits, reduction=reduction)), _weighted("pos_weight", 3)(partial(TF.binary_cross_entropy_with_logits, reduction=reduction)), "BinaryCrossEntropyWithLogitsBackward", _logits_binary, True),
        Loss(f"ce_weight_{reduction}", _weighted("weight", 4)(partial(MF.cross_entropy, reduction=reduction)), _weighted("weight", 4)(partial(TF.cross_entropy, reduction=reduction)), "CrossEntropyBackward", partial(_logits_classes, ignore=True)),
        Loss(f"ce_soft_weight_{reduction}", _weighted("weight", 4)(partial(MF.cross_entropy, reduction=reduction)), _weighted("weight", 4)(partial(TF.cross_entropy, reduction=reduction)), "CrossEntropyBackward", _logits_soft, True),
    ]
for reduction in ("mean", "sum", "none"):
    LOSSES += [
        Loss(f"ce_ignore_index_1_{reduction}", *_both(MF.cross_entropy, TF.cross_entropy, reduction=reduction, ignore_index=1), "CrossEntropyBackward", _logits_classes),
        Loss(f"ce_ignore_index_1_weight_smooth_{reduction}", _weighted("weight", 4)(partial(MF.cross_entropy, reduction=reduction, ignore_index=1, label_smoothing=0.2)), _weighted("weight", 4)(partial(TF.cross_entropy, reduction=reduction, ignore_index=1, label_smoothing=0.2)), "CrossEntropyBackward", _logits_classes),
        Loss(f"ce_2d_ignore_index_1_{reduction}", *_both(MF.cross_entropy, TF.cross_entropy, reduction=reduction, ignore_index=1), "CrossEntropyBackward", partial(_logits_classes, extra=(2, 3))),
    ]


# ------------------------------------------------------------------ parity


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(t.is_floating_point())


def assert_parity(ours: Callable, stock: Callable, inputs: list[torch.Tensor], grad_fn: str | None, *, rtol, atol):
    """Forward values and the gradient of every floating input equal stock autograd's.

    The upstream gradient is random (not ones), so a rule that is wrong only off the
    diagonal of its Jacobian still fails. `grad_fn` is the node our rule must create.
    """
    ours_in = [leaf(t) for t in inputs]
    stock_in = [leaf(t) for t in inputs]
    out_ours, out_stock = ours(*ours_in), stock(*stock_in)
    assert out_ours.dtype == out_stock.dtype and out_ours.shape == out_stock.shape
    torch.testing.assert_close(out_ours, out_stock, rtol=rtol, atol=atol, equal_nan=True)
    if grad_fn is not None:
        assert type(out_ours.grad_fn).__name__ == grad_fn, f"expected {grad_fn}, got {out_ours.grad_fn}"
    upstream = torch.randn(out_stock.shape, dtype=out_stock.dtype, device=out_stock.device)
    wrt = [i for i, t in enumerate(stock_in) if t.requires_grad]
    g_ours = torch.autograd.grad(out_ours, [ours_in[i] for i in wrt], upstream, allow_unused=True)
    g_stock = torch.autograd.grad(out_stock, [stock_in[i] for i in wrt], upstream, allow_unused=True)
    for i, a, b in zip(wrt, g_ours, g_stock):
        if b is None:
            assert a is None or not a.any(), f"input {i}: we give a gradient where autograd gives none"
            continue
        assert a is not None, f"input {i}: no gradient from our rule"
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"gradient of input {i}: {m}")
