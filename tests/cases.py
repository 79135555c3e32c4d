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

# norm branch: the activations torchvision's CNNs use (domains reach past their kinks: ±3, 0 and 6, ±1)
ACTIVATIONS += [
    Activation("relu6", MF.relu6, TF.relu6, "ReLU6Backward", (-3.0, 8.0)),
    Activation("hardtanh", MF.hardtanh, TF.hardtanh, "HardtanhBackward"),
    Activation("hardtanh_-2_0.5", partial(MF.hardtanh, min_val=-2.0, max_val=0.5), partial(TF.hardtanh, min_val=-2.0, max_val=0.5), "HardtanhBackward"),
    Activation("hardsigmoid", MF.hardsigmoid, TF.hardsigmoid, "HardsigmoidBackward", (-5.0, 5.0)),
    Activation("hardswish", MF.hardswish, TF.hardswish, "HardswishBackward", (-5.0, 5.0)),
    Activation("mish", MF.mish, TF.mish, "MishBackward", (-5.0, 5.0)),
]
INPLACE += [
    Activation("relu6_", partial(MF.relu6, inplace=True), partial(TF.relu6, inplace=True), "InplaceElementwiseBackward", (-3.0, 8.0)),
    Activation("hardtanh_", partial(MF.hardtanh, min_val=-2.0, max_val=0.5, inplace=True), partial(TF.hardtanh, min_val=-2.0, max_val=0.5, inplace=True), "InplaceElementwiseBackward"),
    Activation("hardsigmoid_", partial(MF.hardsigmoid, inplace=True), partial(TF.hardsigmoid, inplace=True), "InplaceElementwiseBackward", (-5.0, 5.0)),
    Activation("hardswish_", partial(MF.hardswish, inplace=True), partial(TF.hardswish, inplace=True), "InplaceElementwiseBackward", (-5.0, 5.0)),
    Activation("mish_", partial(MF.mish, inplace=True), partial(TF.mish, inplace=True), "InplaceElementwiseBackward", (-5.0, 5.0)),
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

# ---- weights under every reduction, and a non-default ignore_index (mutants that survived a
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
    if not wrt:  # integer inputs only (embedding indices): the module's parameter gradients are compared by the caller
        return
    g_ours = torch.autograd.grad(out_ours, [ours_in[i] for i in wrt], upstream, allow_unused=True)
    g_stock = torch.autograd.grad(out_stock, [stock_in[i] for i in wrt], upstream, allow_unused=True)
    for i, a, b in zip(wrt, g_ours, g_stock):
        if b is None:
            assert a is None or not a.any(), f"input {i}: we give a gradient where autograd gives none"
            continue
        assert a is not None, f"input {i}: no gradient from our rule"
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"gradient of input {i}: {m}")


# ------------------------------------------------------------------ normalisation (norm branch)


@dataclass(frozen=True)
class Norm:
    """A normalisation call: ours and stock with the same non-tensor settings bound, and its inputs.

    `make(device, dtype)` returns the tensors (x first, then γ, β where the case has them);
    running statistics, where a case has them, are made fresh inside the call so both sides
    start from the same buffers.
    """

    name: str
    ours: Callable
    stock: Callable
    grad_fn: str
    make: Callable

    def __repr__(self) -> str:
        return self.name


def _norm_inputs(x_shape, param_shape, affine=(True, True)):
    def make(device, dtype):
        x = (torch.randn(x_shape, dtype=torch.float64) * 2 + 0.5).to(device=device, dtype=dtype)
        params = [torch.randn(param_shape, dtype=torch.float64).to(device=device, dtype=dtype) for on in affine if on]
        return [x, *params]

    return make


def _with_running_stats(fn, num_channels, training):
    """fn(x, running_mean, running_var, γ, β, training) with fresh, non-trivial running statistics."""

    def call(x, *params):
        running_mean = torch.linspace(-0.5, 0.5, num_channels, dtype=torch.float32, device=x.device)
        running_var = torch.linspace(0.5, 2.0, num_channels, dtype=torch.float32, device=x.device)
        if x.dtype == torch.float64:
            running_mean, running_var = running_mean.double(), running_var.double()
        weight, bias = (*params, None, None)[:2]
        return fn(x, running_mean, running_var, weight, bias, training)

    return call


def _no_stats(fn, training=True):
    return lambda x, *params: fn(x, None, None, *(params + (None, None))[:2], training)


NORMS = [
    Norm("batch_norm_1d", _no_stats(MF.batch_norm), _no_stats(TF.batch_norm), "BatchNormBackward", _norm_inputs((6, 3), (3,))),
    Norm("batch_norm_1d_seq", _no_stats(MF.batch_norm), _no_stats(TF.batch_norm), "BatchNormBackward", _norm_inputs((3, 2, 5), (2,))),
    Norm("batch_norm_2d", _no_stats(MF.batch_norm), _no_stats(TF.batch_norm), "BatchNormBackward", _norm_inputs((3, 2, 4, 5), (2,))),
    Norm("batch_norm_3d", _no_stats(MF.batch_norm), _no_stats(TF.batch_norm), "BatchNormBackward", _norm_inputs((2, 2, 3, 2, 2), (2,))),
    Norm("batch_norm_no_affine", _no_stats(MF.batch_norm), _no_stats(TF.batch_norm), "BatchNormBackward", _norm_inputs((3, 2, 4), (2,), (False, False))),
    Norm("batch_norm_running", _with_running_stats(MF.batch_norm, 2, True), _with_running_stats(TF.batch_norm, 2, True), "BatchNormBackward", _norm_inputs((3, 2, 4, 4), (2,))),
    Norm("batch_norm_eval_2d", _with_running_stats(MF.batch_norm, 2, False), _with_running_stats(TF.batch_norm, 2, False), "BatchNormEvalBackward", _norm_inputs((3, 2, 4, 5), (2,))),
    Norm("batch_norm_eval_1d_no_affine", _with_running_stats(MF.batch_norm, 3, False), _with_running_stats(TF.batch_norm, 3, False), "BatchNormEvalBackward", _norm_inputs((5, 3), (3,), (False, False))),
    Norm("layer_norm", lambda x, w, b: MF.layer_norm(x, (5,), w, b), lambda x, w, b: TF.layer_norm(x, (5,), w, b), "LayerNormBackward", _norm_inputs((4, 5), (5,))),
    Norm("layer_norm_2d_shape", lambda x, w, b: MF.layer_norm(x, (3, 5), w, b), lambda x, w, b: TF.layer_norm(x, (3, 5), w, b), "LayerNormBackward", _norm_inputs((2, 4, 3, 5), (3, 5))),
    Norm("layer_norm_no_bias", lambda x, w: MF.layer_norm(x, [6], w, eps=1e-3), lambda x, w: TF.layer_norm(x, [6], w, eps=1e-3), "LayerNormBackward", _norm_inputs((2, 3, 6), (6,), (True,))),
    Norm("layer_norm_no_affine", lambda x: MF.layer_norm(x, (4,)), lambda x: TF.layer_norm(x, (4,)), "LayerNormBackward", _norm_inputs((3, 4), (4,), ())),
    Norm("layer_norm_unbatched", lambda x, w, b: MF.layer_norm(x, (2, 3), w, b), lambda x, w, b: TF.layer_norm(x, (2, 3), w, b), "LayerNormBackward", _norm_inputs((2, 3), (2, 3))),
    Norm("rms_norm", lambda x, w: MF.rms_norm(x, (5,), w), lambda x, w: TF.rms_norm(x, (5,), w), "RMSNormBackward", _norm_inputs((4, 5), (5,), (True,))),
    Norm("rms_norm_eps_2d_shape", lambda x, w: MF.rms_norm(x, (3, 4), w, 1e-3), lambda x, w: TF.rms_norm(x, (3, 4), w, 1e-3), "RMSNormBackward", _norm_inputs((2, 3, 4), (3, 4), (True,))),
    Norm("rms_norm_no_weight", lambda x: MF.rms_norm(x, [4]), lambda x: TF.rms_norm(x, [4]), "RMSNormBackward", _norm_inputs((3, 4), (4,), ())),
    Norm("group_norm", lambda x, w, b: MF.group_norm(x, 3, w, b), lambda x, w, b: TF.group_norm(x, 3, w, b), "GroupNormBackward", _norm_inputs((2, 6, 5), (6,))),
    Norm("group_norm_one_group_2d", lambda x, w, b: MF.group_norm(x, 1, w, b), lambda x, w, b: TF.group_norm(x, 1, w, b), "GroupNormBackward", _norm_inputs((2, 4, 3, 3), (4,))),
    Norm("group_norm_group_per_channel", lambda x, w, b: MF.group_norm(x, 4, w, b, 1e-3), lambda x, w, b: TF.group_norm(x, 4, w, b, 1e-3), "GroupNormBackward", _norm_inputs((3, 4, 5), (4,))),
    Norm("group_norm_no_affine", lambda x: MF.group_norm(x, 2), lambda x: TF.group_norm(x, 2), "GroupNormBackward", _norm_inputs((2, 4, 3), (4,), ())),
]


# ------------------------------------------------------- convolution and pooling


@dataclass(frozen=True)
class Spatial:
    """One convolution/padding/pooling case: our function and torch's, called as f(*inputs, **kwargs)."""

    name: str
    ours: Callable
    stock: Callable
    shapes: tuple  # shapes of the floating inputs (input, weight, bias, ...), made by `make`
    kwargs: dict = field(default_factory=dict)
    grad_fn: str = ""

    def __repr__(self) -> str:
        return self.name

    def make(self, device="cpu", dtype=torch.float32, generator=None) -> list[torch.Tensor]:
        return [torch.randn(s, dtype=dtype, generator=generator).to(device) for s in self.shapes]

    def call(self, fn):
        return partial(fn, **self.kwargs)


def _conv(d, *shapes, **kwargs):
    return MF.__dict__[f"conv{d}d"], TF.__dict__[f"conv{d}d"], shapes, kwargs, "ConvolutionBackward"


def _conv_t(d, *shapes, **kwargs):
    return MF.__dict__[f"conv_transpose{d}d"], TF.__dict__[f"conv_transpose{d}d"], shapes, kwargs, "ConvTransposeBackward"


def _pad(*shapes, **kwargs):
    return MF.pad, TF.pad, shapes, kwargs, "PadBackward"


CONV_CASES = [Spatial(name, *spec) for name, spec in [
    ("conv1d", _conv(1, (2, 3, 9), (4, 3, 3), (4,), stride=2, padding=1)),
    ("conv1d_valid_no_bias", _conv(1, (2, 3, 9), (4, 3, 3), padding="valid")),
    ("conv1d_unbatched_same_dilated", _conv(1, (3, 9), (4, 3, 3), (4,), padding="same", dilation=2)),
    ("conv2d", _conv(2, (2, 3, 7, 6), (4, 3, 3, 3), (4,), padding=1)),
    ("conv2d_stride_dilation_groups", _conv(2, (2, 4, 9, 8), (6, 2, 3, 2), (6,), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)),
    ("conv2d_depthwise", _conv(2, (2, 4, 7, 6), (4, 1, 3, 3), (4,), stride=2, padding=1, groups=4)),
    ("conv2d_depthwise_many_positions", _conv(2, (2, 3, 10, 9), (3, 1, 3, 2), (3,), padding=2, dilation=(2, 1), groups=3)),
    ("conv2d_depthwise_multiplier", _conv(2, (2, 3, 6, 6), (6, 1, 3, 3), padding=1, groups=3)),
    ("conv2d_same_even_kernel", _conv(2, (2, 3, 6, 5), (4, 3, 4, 2), (4,), padding="same")),
    ("conv2d_1x1_stride2", _conv(2, (2, 4, 7, 7), (3, 4, 1, 1), stride=2)),
    ("conv2d_stride_drops_tail", _conv(2, (1, 2, 8, 8), (3, 2, 3, 3), (3,), stride=3)),
    ("conv2d_one_output_position_groups", _conv(2, (3, 4, 2, 3), (6, 2, 3, 3), (6,), padding=1, stride=(2, 3), groups=2)),
    ("conv3d_two_output_positions_dilation", _conv(3, (2, 2, 5, 3, 3), (3, 2, 2, 3, 2), dilation=(3, 1, 2))),
    ("conv2d_batch0", _conv(2, (0, 3, 5, 5), (4, 3, 3, 3), (4,), padding=1)),
    ("conv2d_batch1_unbatched", _conv(2, (3, 5, 6), (2, 3, 2, 2), (2,), stride=2)),
    ("conv3d", _conv(3, (2, 2, 5, 4, 5), (3, 2, 3, 3, 2), (3,), stride=2, padding=1)),
    ("conv3d_groups_dilation", _conv(3, (1, 4, 6, 5, 5), (4, 2, 2, 2, 2), dilation=2, groups=2)),
    ("conv_transpose1d", _conv_t(1, (2, 4, 5), (4, 3, 3), (3,), stride=2, padding=1, output_padding=1)),
    ("conv_transpose1d_dilation_output_padding", _conv_t(1, (2, 4, 5), (4, 3, 3), stride=2, output_padding=2, dilation=3)),
    ("conv_transpose2d", _conv_t(2, (2, 3, 4, 5), (3, 2, 3, 3), (2,), stride=2, padding=1)),
    ("conv_transpose2d_groups", _conv_t(2, (2, 4, 5, 4), (4, 3, 3, 2), (6,), stride=(2, 1), padding=1, output_padding=(1, 0), groups=2)),
    ("conv_transpose2d_batch0", _conv_t(2, (0, 3, 4, 4), (3, 2, 3, 3), (2,), stride=2)),
    ("conv_transpose3d_unbatched", _conv_t(3, (2, 3, 3, 2), (2, 2, 2, 2, 2), (2,), stride=2)),
    ("pad_constant", _pad((2, 3, 5, 6), pad=(2, 1, 1, 3), value=2.0)),
    ("pad_constant_negative", _pad((2, 3, 5, 6), pad=(2, -1, -2, 3))),
    ("pad_reflect_1d", _pad((2, 3, 6), pad=(2, 3), mode="reflect")),
    ("pad_reflect_2d", _pad((2, 3, 5, 6), pad=(2, 1, 1, 3), mode="reflect")),
    ("pad_reflect_3d", _pad((1, 2, 4, 5, 3), pad=(1, 2, 2, 0, 1, 3), mode="reflect")),
    ("pad_replicate_2d", _pad((2, 3, 5, 6), pad=(3, 1, 0, 4), mode="replicate")),
    ("pad_replicate_3d", _pad((1, 2, 4, 5, 3), pad=(1, 2, 2, 0, 1, 3), mode="replicate")),
    ("pad_circular_1d", _pad((2, 3, 6), pad=(2, 3), mode="circular")),
    ("pad_circular_2d", _pad((2, 3, 5, 6), pad=(2, 1, 1, 3), mode="circular")),
]]


def _pool(name, grad_fn, *shapes, **kwargs):
    return MF.__dict__[name], TF.__dict__[name], shapes, kwargs, grad_fn


_MAX, _AVG, _AMAX, _AAVG = "MaxPoolBackward", "AvgPoolBackward", "AdaptiveMaxPoolBackward", "AdaptiveAvgPoolBackward"

POOL_CASES = [Spatial(name, *spec) for name, spec in [
    ("max_pool1d", _pool("max_pool1d", _MAX, (2, 3, 9), kernel_size=3, stride=2)),
    ("max_pool1d_dilation_unbatched", _pool("max_pool1d", _MAX, (3, 11), kernel_size=2, stride=1, dilation=2)),
    ("max_pool2d", _pool("max_pool2d", _MAX, (2, 3, 8, 8), kernel_size=2)),
    ("max_pool2d_overlap_ceil_pad", _pool("max_pool2d", _MAX, (2, 3, 7, 8), kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ("max_pool2d_dilation", _pool("max_pool2d", _MAX, (1, 2, 9, 7), kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1))),
    ("max_pool2d_batch0", _pool("max_pool2d", _MAX, (0, 3, 6, 6), kernel_size=2)),
    ("max_pool3d_ceil", _pool("max_pool3d", _MAX, (1, 2, 5, 5, 6), kernel_size=2, ceil_mode=True)),
    ("avg_pool1d_ceil_pad", _pool("avg_pool1d", _AVG, (2, 3, 10), kernel_size=4, stride=3, padding=2, ceil_mode=True)),
    ("avg_pool2d", _pool("avg_pool2d", _AVG, (2, 3, 8, 8), kernel_size=2)),
    ("avg_pool2d_exclude_pad_ceil", _pool("avg_pool2d", _AVG, (2, 3, 7, 8), kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ("avg_pool2d_include_pad_ceil", _pool("avg_pool2d", _AVG, (2, 3, 7, 8), kernel_size=(3, 2), stride=2, padding=1, ceil_mode=True)),
    ("avg_pool2d_divisor_override", _pool("avg_pool2d", _AVG, (3, 7, 8), kernel_size=3, stride=2, padding=1, divisor_override=5)),
    ("avg_pool3d_exclude_pad", _pool("avg_pool3d", _AVG, (1, 2, 5, 5, 6), kernel_size=2, padding=1, count_include_pad=False)),
    ("adaptive_avg_pool1d", _pool("adaptive_avg_pool1d", _AAVG, (2, 3, 7), output_size=3)),
    ("adaptive_avg_pool2d_global", _pool("adaptive_avg_pool2d", _AAVG, (2, 3, 5, 4), output_size=1)),
    ("adaptive_avg_pool2d_none", _pool("adaptive_avg_pool2d", _AAVG, (2, 3, 7, 8), output_size=(3, None))),
    ("adaptive_avg_pool3d", _pool("adaptive_avg_pool3d", _AAVG, (3, 7, 5, 4), output_size=(2, 3, 1))),
    ("adaptive_max_pool1d", _pool("adaptive_max_pool1d", _AMAX, (2, 3, 7), output_size=4)),
    ("adaptive_max_pool2d", _pool("adaptive_max_pool2d", _AMAX, (2, 3, 7, 8), output_size=3)),
    ("adaptive_max_pool2d_upsample", _pool("adaptive_max_pool2d", _AMAX, (1, 2, 3, 3), output_size=(5, 4))),
    ("adaptive_max_pool3d_unbatched", _pool("adaptive_max_pool3d", _AMAX, (3, 7, 5, 4), output_size=2)),
]]


# ------------------------------------------------------ embedding and attention


@dataclass(frozen=True)
class AttentionCase:
    """q: (*batch, L, E), k: (*kv_batch, S, E), v: (*kv_batch, S, Ev), a mask kind and keyword arguments."""

    name: str
    batch: tuple[int, ...]
    L: int
    S: int
    E: int = 4
    Ev: int = 3
    kv_batch: tuple[int, ...] | None = None  # None: the query's batch
    mask: str | None = None  # None, "bool", "float", "bool_full_rows", "float_full_rows", "float_grad"
    mask_batch: tuple[int, ...] = ()  # leading dimensions of the mask (broadcast against the batch)
    kwargs: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name

    def make(self, device, dtype, generator=None):
        g = generator or torch.Generator().manual_seed(0)
        kv_batch = self.batch if self.kv_batch is None else self.kv_batch
        q = torch.randn(*self.batch, self.L, self.E, dtype=dtype, generator=g)
        k = torch.randn(*kv_batch, self.S, self.E, dtype=dtype, generator=g)
        v = torch.randn(*kv_batch, self.S, self.Ev, dtype=dtype, generator=g)
        inputs = [q.to(device), k.to(device), v.to(device)]
        if self.mask is not None:
            keep = torch.rand(*self.mask_batch, self.L, self.S, generator=g) > 0.3
            keep[..., 0] = True  # every row may attend somewhere, unless masked whole below
            if self.mask.endswith("full_rows"):
                keep[..., self.L // 2, :] = False  # one query may attend to nothing
            if self.mask.startswith("bool"):
                mask = keep
            else:
                mask = torch.randn(*self.mask_batch, self.L, self.S, dtype=dtype, generator=g)
                mask = mask.masked_fill(~keep, float("-inf")) if self.mask != "float_grad" else mask
            inputs.append(mask.to(device))
        return inputs

    def call(self, fn):
        """fn(q, k, v[, mask]) with this case's keyword arguments."""
        kwargs = self.kwargs

        def run(q, k, v, mask=None):
            return fn(q, k, v, attn_mask=mask, **kwargs)

        return run


ATTENTION_CASES = [
    AttentionCase("4d", (2, 3), 5, 6),
    AttentionCase("3d", (2,), 4, 4),
    AttentionCase("2d_unbatched", (), 3, 5),
    AttentionCase("batch_0", (0, 2), 3, 4),
    AttentionCase("T_1", (2, 2), 1, 1),
    AttentionCase("bool_mask", (2, 3), 5, 6, mask="bool"),
    AttentionCase("bool_mask_per_head", (2, 3), 5, 6, mask="bool", mask_batch=(2, 3)),
    AttentionCase("float_mask", (2, 3), 5, 6, mask="float", mask_batch=(2, 1)),
    AttentionCase("float_mask_grad", (2, 3), 4, 5, mask="float_grad"),
    AttentionCase("bool_full_rows", (2, 3), 5, 6, mask="bool_full_rows"),
    AttentionCase("float_full_rows", (2, 3), 5, 6, mask="float_full_rows"),
    AttentionCase("causal", (2, 3), 5, 5, kwargs=dict(is_causal=True)),
    AttentionCase("causal_L_lt_S", (2, 2), 3, 6, kwargs=dict(is_causal=True)),
    AttentionCase("causal_L_gt_S", (2, 2), 6, 3, kwargs=dict(is_causal=True)),
    AttentionCase("scale", (2, 3), 5, 6, mask="bool", kwargs=dict(scale=0.3)),
    AttentionCase("gqa", (2, 4), 5, 6, kv_batch=(2, 2), kwargs=dict(enable_gqa=True)),
    AttentionCase("gqa_mask", (2, 6), 3, 4, kv_batch=(2, 2), mask="bool_full_rows", kwargs=dict(enable_gqa=True)),
    AttentionCase("broadcast_kv", (2, 3), 4, 5, kv_batch=(1, 3)),
]


# ------------------------------------------------ native fused MLP

# The fused MLP rule's autograd node: the Python rule's, or its native twin's (csrc/mlp.cpp), whose
# C++ node Python sees as a `CppFunction` named "torch::autograd::CppNode<manual_backprop::NativeMLP>".
FUSED_MLP = {"MLPBackward", "NativeMLPBackward"}


def node_name(node) -> str:
    """A grad_fn's type name; the native MLP's C++ node as "NativeMLPBackward"."""
    if node is not None and type(node).__name__ == "CppFunction" and "NativeMLP" in node.name():
        return "NativeMLPBackward"
    return type(node).__name__
