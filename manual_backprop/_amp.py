"""Autocast for our rules, done the way torch's own kernels get it.

`torch.amp.custom_fwd` cannot be combined with the `setup_context` style that
torch.func needs (pytorch issue 132388), so we reproduce autocast's casting one
level up instead: the functional API casts a rule's inputs exactly as autocast
would cast the inputs of the stock op it replaces (the policy tables below are
copied from aten/src/ATen/autocast_mode.cpp), then calls the rule on tensors of
one dtype. The casts are ordinary differentiable `.to()` calls, as in stock
autograd, so gradients reach fp32 parameters in fp32.

Backward may run while autocast is still on (when `.backward()` is called inside
the autocast region), so rule backwards use `without_autocast` to compute in the
dtypes forward saved, never in ones autocast picks.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from manual_backprop import observe

# Policies, named after autocast_mode.cpp.
LOWER = "lower_precision_fp"  # cast floating inputs to the autocast dtype
FP32 = "fp32"  # cast floating inputs to float32
KEEP = "keep"  # op not in autocast's lists: run in the input dtype

# op -> policy, per device type. Ops absent from a table are KEEP.
_POLICY: dict[str, dict[str, str]] = {
    "cpu": {
        "linear": LOWER,
        "mse_loss": FP32,
        "binary_cross_entropy": FP32,
        "binary_cross_entropy_with_logits": FP32,
        "cross_entropy": FP32,
        # norm branch: AutocastCPU lists prelu as lower_precision_fp and no norm at all
        # (batch_norm, layer_norm, group_norm, rms_norm keep the input's dtype; mixed-dtype kernels)
        "prelu": LOWER,
        # convolution and pooling: conv and conv_transpose in the lower precision; the
        # 3-d pools and reflect/replicate padding kernels in fp32 (max_pool3d_with_indices is not listed)
        **dict.fromkeys(["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"], LOWER),
        **dict.fromkeys(["max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "adaptive_max_pool3d",
                         "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d",
                         "replication_pad3d"], FP32),
        # embedding and attention (embedding is in no list: it keeps its dtype)
        "scaled_dot_product_attention": LOWER,
        "addmm": LOWER,  # transformers' Conv1D
        # recurrent: AutocastCPU lists mkldnn_rnn_layer, the kernel torch.lstm runs each layer of on padded
        # input, and linear, the products rnn_tanh/relu and their cells are made of: their outputs come out
        # in the lower precision. gru and gru_cell run in float32 (nothing inside them is listed). lstm_cell
        # and lstm on a PackedSequence's data ("_packed": the second overload) form the products in the
        # lower precision but update the float32 state c in float32, so their outputs stay float32; the
        # rules, one dtype throughout, run them in float32. lstm with proj_size ("lstm_proj") is not oneDNN's
        # either: torch runs it as the packed one, c_n in float32 and the projected h in the lower precision,
        # so it keeps float32 inputs as "lstm_packed" does.
        **dict.fromkeys(["lstm", "rnn_tanh", "rnn_relu", "rnn_tanh_packed", "rnn_relu_packed", "rnn_tanh_cell",
                         "rnn_relu_cell"], LOWER),
    },
    "cuda": {
        "linear": LOWER,
        "softplus": FP32,
        "softmax": FP32,  # fp32_set_opt_dtype: softmax runs and returns in fp32
        "mse_loss": FP32,
        "binary_cross_entropy_with_logits": FP32,
        "cross_entropy": FP32,  # log_softmax (fp32_set_opt_dtype) + nll_loss (fp32)
        # norm branch: AT_FORALL_FP32 has layer_norm, group_norm, rms_norm (batch_norm is in no
        # CUDA list: cudnn takes a half input with float32 γ, β); AT_FORALL_LOWER_PRECISION_FP has prelu
        "layer_norm": FP32,
        "group_norm": FP32,
        "rms_norm": FP32,
        "prelu": LOWER,
        # convolution: conv and conv_transpose in the lower precision; no pool or pad is listed
        **dict.fromkeys(["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"], LOWER),
        # embedding and attention (embedding is in no list: it keeps its dtype)
        "scaled_dot_product_attention": LOWER,
        "addmm": LOWER,  # transformers' Conv1D
        # recurrent: the four cells are in AT_FORALL_LOWER_PRECISION_FP; lstm, gru, rnn_* run cuDNN's
        # _cudnn_rnn, whose autocast kernel (_cudnn_rnn_cast_reflatten) casts to the lower precision
        **dict.fromkeys(["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu", "lstm_packed", "gru_packed", "rnn_tanh_packed",
                         "rnn_relu_packed", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"], LOWER),
    },
}

# autocast refuses these outright (aten binary_cross_entropy_banned); so do we.
_BANNED = {"cuda": {"binary_cross_entropy"}}

_BCE_BANNED_MESSAGE = (
    "manual_backprop.functional.binary_cross_entropy and BCELoss are unsafe to autocast "
    "(as in torch). Many models use a sigmoid layer right before the binary cross "
    "entropy layer; combine the two with binary_cross_entropy_with_logits or "
    "BCEWithLogitsLoss, which are safe to autocast."
)


# Is autocast on for any device? One cheap check, for the hot paths (autocast_inputs, without_autocast,
# and callers that skip even the call to autocast_inputs at course sizes).
autocast_on = torch._C._is_any_autocast_enabled


def _eligible(t: torch.Tensor | None) -> bool:
    # autocast casts floating tensors other than float64 (autocast_mode.h is_eligible).
    return t is not None and t.is_floating_point() and t.dtype is not torch.float64


def autocast_inputs(op: str, device: torch.device, *tensors: torch.Tensor | None):
    """Cast `tensors` as autocast would cast the inputs of the stock `op`.

    Returns the tensors unchanged (and fast) when autocast is off for `device`.
    """
    if not autocast_on():  # the common case, one cheap check
        return tensors
    device_type = device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    if op in _BANNED.get(device_type, ()):
        raise RuntimeError(_BCE_BANNED_MESSAGE)
    policy = _POLICY.get(device_type, _POLICY["cuda"]).get(op, KEEP)
    if policy == KEEP:
        return tensors
    dtype = torch.get_autocast_dtype(device_type) if policy == LOWER else torch.float32
    cast = tuple(t.to(dtype) if _eligible(t) else t for t in tensors)
    for original, copy in zip(tensors, cast):  # a watched parameter's copy still names that parameter
        observe.cast(original, copy)
    return cast


def autocast_nested(op: str, device: torch.device, args: tuple) -> tuple:
    """`autocast_inputs` for an op whose tensors sit in tuples and lists (torch.lstm's hx = (h0, c0), its
    params list); every other argument passes through."""
    if not autocast_on():
        return args
    leaves, spec = tree_flatten(args)
    at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    for i, cast in zip(at, autocast_inputs(op, device, *(leaves[i] for i in at))):
        leaves[i] = cast
    return tree_unflatten(leaves, spec)


F = TypeVar("F", bound=Callable)


def recurrent_autocast_name(op: str, args: tuple) -> str:
    """The name `_amp`'s policy knows torch's call `op(*args)` by: "lstm_packed" for a PackedSequence's data
    (the overload whose fourth argument is the params list), "lstm_proj" for lstm with proj_size (h0 and c0
    of different widths), else `op`."""
    if len(args) > 3 and isinstance(args[3], (list, tuple)):
        return op + "_packed"
    if op == "lstm" and len(args) > 1 and args[1][0].shape[-1] != args[1][1].shape[-1]:
        return "lstm_proj"
    return op


def without_autocast(backward: F) -> F:
    """Run a rule's backward with autocast off for the gradient's device."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not autocast_on():  # the common case: one cheap check
            return backward(ctx, *grads)
        device = next((g.device for g in grads if g is not None), None)
        if device is not None and torch.is_autocast_enabled(device.type):
            with torch.autocast(device.type, enabled=False):
                return backward(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper  # type: ignore[return-value]
