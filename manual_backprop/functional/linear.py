"""The linear layer, z = a Wᵀ + b, on `rules.Linear`: torch.nn.functional.linear's signature, its shape
and dtype checks, and autocast's casts."""

from __future__ import annotations

import torch

from manual_backprop import _checks, rules
from manual_backprop._amp import autocast_inputs, autocast_on
from manual_backprop._checks import InputError, shape
from manual_backprop.rules import _native
from manual_backprop.rules._apply import apply_rule


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """z = a Wᵀ + b.  Input: (*, in_features); weight: (out, in); bias: (out,). Output: (*, out)."""
    w_shape = weight.shape  # one read of each shape on the hot path; the messages below only on failure
    if not (len(w_shape) == 2 and input.dim() != 0 and input.shape[-1] == w_shape[1]
            and (bias is None or bias.shape == w_shape[:1])):
        _linear_shape_error(input, weight, bias)
    if autocast_on():
        input, weight, bias = autocast_inputs("linear", input.device, input, weight, bias)
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        _checks.same_dtype("linear", input=input, weight=weight, bias=bias)
    native = _native.layers_now(input, rules.Linear)  # the rule's C++ twin (csrc/layers.cpp) where it may run
    if native is not None:
        return native.linear(input, weight, bias)
    return apply_rule(rules.Linear, input, weight, bias)


def _linear_shape_error(input, weight, bias) -> None:
    if weight.dim() != 2:
        raise InputError(f"linear: weight must be 2-D (out_features, in_features), got shape {shape(weight)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise InputError(
            f"linear: input's last dimension must equal in_features={weight.shape[1]}, "
            f"got input of shape {shape(input)} for weight of shape {shape(weight)}"
        )
    if bias is not None and shape(bias) != (weight.shape[0],):
        raise InputError(
            f"linear: bias must have shape ({weight.shape[0]},) to match weight {shape(weight)}, got {shape(bias)}"
        )
