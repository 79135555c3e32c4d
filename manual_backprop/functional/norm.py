"""Normalisation on the rules of `rules.norm`: batch norm (batch statistics in training, with the running
ones updated as torch updates them; the running ones in eval), layer norm, RMS norm and group norm, with
torch's shape checks and its mixed-dtype (float32 parameters beside a half input) allowance."""

from __future__ import annotations

import torch

from manual_backprop import rules
from manual_backprop._amp import autocast_inputs
from manual_backprop._checks import InputError, shape
from manual_backprop.functional._common import _constant
from manual_backprop.rules._apply import apply_rule


def _norm_param_dtypes(op: str, input: torch.Tensor, **params: torch.Tensor | None) -> None:
    """γ, β (and running statistics) share the input's dtype, or are float32 beside a bf16/fp16 input
    (torch's mixed-dtype normalisation kernels; what autocast leaves on CPU)."""
    low = input.dtype in (torch.float16, torch.bfloat16)
    for name, t in params.items():
        if t is not None and t.dtype != input.dtype and not (low and t.dtype == torch.float32):
            described = ", ".join(f"{n}={p.dtype}" for n, p in params.items() if p is not None)
            raise InputError(f"{op}: mixed dtypes: input={input.dtype}, {described}; parameters must be "
                             "the input's dtype (or float32 beside a bfloat16/float16 input)")


def _per_channel(op: str, num_channels: int, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.numel() != num_channels:
            raise InputError(f"{op}: {name} should contain {num_channels} elements not {t.numel()} "
                             f"(shape {shape(t)})")


def _verify_batch_size(size) -> None:
    values_per_channel = size[0]
    for s in size[2:]:
        values_per_channel *= s
    if values_per_channel == 1:
        raise InputError(f"Expected more than 1 value per channel when training, got input size {torch.Size(size)}")


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Input: (N, C, *). Training: batch statistics, and the running ones updated in place
    (running ← (1 − momentum)·running + momentum·batch, with the unbiased batch variance), as torch.
    Eval: the running statistics, a per-channel affine map."""
    op = "batch_norm"
    if input.dim() < 2:
        raise InputError(f"{op}: expected input of shape (N, C, *) with at least 2 dims, got {shape(input)}")
    if training:
        _verify_batch_size(input.shape)
        if eps <= 0.0:
            raise InputError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise InputError(f"batch_norm eps must be non-negative, but got {eps}")
    elif running_mean is None or running_var is None:
        raise InputError(f"{op}: running_mean must be defined in evaluation mode")
    num_channels = input.shape[1]
    _per_channel(op, num_channels, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    _constant(op, running_mean=running_mean, running_var=running_var)
    input, weight, bias = autocast_inputs(op, input.device, input, weight, bias)
    _norm_param_dtypes(op, input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    if weight is not None and weight.dim() != 1:  # torch takes any shape with C elements
        weight = weight.reshape(-1)
    if bias is not None and bias.dim() != 1:
        bias = bias.reshape(-1)
    if not training:
        return apply_rule(
            rules.BatchNormEval, input, running_mean.reshape(-1), running_var.reshape(-1), weight, bias, eps
        )
    output, mean, var = apply_rule(rules.BatchNorm, input, weight, bias, eps)
    n = input.numel() // max(num_channels, 1)  # values per channel
    if n > 0:  # a no-grad side effect, not part of the gradient (torch skips empty batches too)
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.reshape(running_mean.shape), alpha=momentum)
            if running_var is not None:
                unbiased = var.reshape(running_var.shape) * (n / (n - 1))
                running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    return output


def _normalized_shape(normalized_shape) -> tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def _check_normalized_shape(op: str, input, normalized_shape, **params) -> None:
    k = len(normalized_shape)
    if k == 0:
        raise InputError(f"{op}: normalized_shape must have at least one dimension, got {normalized_shape}")
    if input.dim() < k or shape(input)[input.dim() - k :] != normalized_shape:
        raise InputError(
            f"{op}: Given normalized_shape={list(normalized_shape)}, expected input with shape "
            f"[*, {', '.join(map(str, normalized_shape))}], but got input of size{list(input.shape)}"
        )
    for name, t in params.items():
        if t is not None and shape(t) != normalized_shape:
            raise InputError(f"{op}: expected {name} of shape {normalized_shape}, got {shape(t)}")


def layer_norm(
    input: torch.Tensor,
    normalized_shape: list[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Input: (*, *normalized_shape); weight, bias: normalized_shape. Output: like input."""
    normalized_shape = _normalized_shape(normalized_shape)
    _check_normalized_shape("layer_norm", input, normalized_shape, weight=weight, bias=bias)
    input, weight, bias = autocast_inputs("layer_norm", input.device, input, weight, bias)
    _norm_param_dtypes("layer_norm", input, weight=weight, bias=bias)
    output, _, _ = apply_rule(rules.LayerNorm, input, normalized_shape, weight, bias, eps)
    return output


def rms_norm(
    input: torch.Tensor,
    normalized_shape: list[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """Input: (*, *normalized_shape); weight: normalized_shape. eps=None: the machine epsilon of the
    dtype the statistics are computed in (float32 for bf16/fp16 inputs), as torch."""
    normalized_shape = _normalized_shape(normalized_shape)
    _check_normalized_shape("rms_norm", input, normalized_shape, weight=weight)
    input, weight = autocast_inputs("rms_norm", input.device, input, weight)
    _norm_param_dtypes("rms_norm", input, weight=weight)
    if eps is None:
        eps = torch.finfo(rules.norm.opmath(input).dtype if input.is_floating_point() else torch.float32).eps
    output, _ = apply_rule(rules.RMSNorm, input, normalized_shape, weight, eps)
    return output


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Input: (N, C, *), C divisible by num_groups; weight, bias: (C,). Output: like input."""
    op = "group_norm"
    if input.dim() < 2:
        raise InputError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    num_channels = input.shape[1]
    if num_groups <= 0 or num_channels % num_groups:
        raise InputError(
            "Expected number of channels in input to be divisible by num_groups, but got input of shape "
            f"{list(input.shape)} and num_groups={num_groups}"
        )
    _verify_batch_size([input.shape[0] * num_channels // num_groups, num_groups, *input.shape[2:]])
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and shape(t) != (num_channels,):
            raise InputError(f"{op}: expected {name} of shape ({num_channels},), got {shape(t)}")
    input, weight, bias = autocast_inputs(op, input.device, input, weight, bias)
    _norm_param_dtypes(op, input, weight=weight, bias=bias)
    output, _, _ = apply_rule(rules.GroupNorm, input, num_groups, weight, bias, eps)
    return output
