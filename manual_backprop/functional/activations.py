"""Activations, a = σ(z), on the rules of `rules.activations`: the elementwise ones (sigmoid, tanh, the
ReLU family, GELU, SiLU, softplus, and the hard and smooth variants torchvision's CNNs use), their in-place
forms, PReLU with its learned slope, and softmax."""

from __future__ import annotations

import torch

from manual_backprop import _checks, rules
from manual_backprop._amp import autocast_inputs, autocast_on
from manual_backprop._checks import InputError, shape
from manual_backprop.rules import _native
from manual_backprop.rules._apply import apply_rule


def _activate(op: str, rule, input: torch.Tensor, inplace: bool, *params) -> torch.Tensor:
    if autocast_on():
        (input,) = autocast_inputs(op, input.device, input)
    if inplace:
        z_before = input.clone() if rule.sigma_prime_from == "z" else None
        return apply_rule(rules.activations.InplaceElementwise, rule, input, z_before, *params)
    native = _native.layers_now(input, rule)  # the rule's C++ twin (csrc/layers.cpp) where it may run
    code = None if native is None else _native.activation_code(rule, params)
    if code is not None:
        return native.elementwise(input, *code)
    return apply_rule(rule, input, *params)


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    return _activate("sigmoid", rules.Sigmoid, input, False)


def tanh(input: torch.Tensor) -> torch.Tensor:
    return _activate("tanh", rules.Tanh, input, False)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return _activate("relu", rules.ReLU, input, inplace)


def leaky_relu(input: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False) -> torch.Tensor:
    return _activate("leaky_relu", rules.LeakyReLU, input, inplace, negative_slope)


def elu(input: torch.Tensor, alpha: float = 1.0, inplace: bool = False) -> torch.Tensor:
    return _activate("elu", rules.ELU, input, inplace, alpha)


def softplus(input: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    return _activate("softplus", rules.Softplus, input, False, beta, threshold)


def silu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return _activate("silu", rules.SiLU, input, inplace)


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if approximate not in ("none", "tanh"):
        raise InputError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _activate("gelu", rules.GELU, input, False, approximate)


def identity(input: torch.Tensor) -> torch.Tensor:
    return _activate("identity", rules.Identity, input, False)


def softmax(
    input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> torch.Tensor:
    if dim is None:
        dim = torch.nn.functional._get_softmax_dim("softmax", input.dim(), _stacklevel)
    if not -max(input.dim(), 1) <= dim < max(input.dim(), 1):
        raise InputError(f"softmax: dim={dim} is out of range for input of shape {shape(input)}")
    if dtype is not None:
        input = input.to(dtype)
    else:
        (input,) = autocast_inputs("softmax", input.device, input)
    return apply_rule(rules.Softmax, input, dim)


# the activations torchvision's CNNs use


def relu6(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return _activate("relu6", rules.ReLU6, input, inplace)


def hardtanh(input: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> torch.Tensor:
    if min_val > max_val:
        raise InputError(f"hardtanh: min_val cannot be greater than max_val, got min_val={min_val}, max_val={max_val}")
    return _activate("hardtanh", rules.Hardtanh, input, inplace, min_val, max_val)


def hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return _activate("hardsigmoid", rules.Hardsigmoid, input, inplace)


def hardswish(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return _activate("hardswish", rules.Hardswish, input, inplace)


def mish(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return _activate("mish", rules.Mish, input, inplace)


def prelu(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """a = z for z > 0, α z otherwise; weight: 1 slope, or one per channel (input's dim 1)."""
    channels = input.shape[1] if input.dim() >= 2 else 1
    if weight.numel() != 1 and weight.numel() != channels:
        raise InputError(
            "Mismatch of parameter numbers and input channel size. Found parameter numbers = "
            f"{weight.numel()} and channel size = {channels}."
        )
    input, weight = autocast_inputs("prelu", input.device, input, weight)
    if input.dtype != weight.dtype:
        _checks.same_dtype("prelu", input=input, weight=weight)
    return apply_rule(rules.PReLU, input, weight)
