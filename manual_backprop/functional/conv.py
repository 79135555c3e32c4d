"""Convolution on the rules of `rules.conv`: conv1d/2d/3d (with 'same' and 'valid' padding), the transposed
convolutions, and pad in its four modes, with torch's argument checks and messages."""

from __future__ import annotations

import torch

from manual_backprop import _checks, rules
from manual_backprop._amp import autocast_inputs
from manual_backprop._checks import InputError, shape
from manual_backprop.functional._common import _ntuple, _spatial_input
from manual_backprop.rules._apply import apply_rule


def _conv_checks(op: str, d: int, input, weight, bias, stride, dilation, groups, transposed: bool) -> None:
    if weight.dim() != d + 2:
        raise InputError(f"{op}: weight must be {d + 2}-D, got weight of size {list(weight.shape)}")
    _spatial_input(op, input, d)
    if any(s <= 0 for s in stride):
        raise InputError(f"{op}: non-positive stride is not supported, got stride={stride}")
    if any(s <= 0 for s in dilation):
        raise InputError(f"{op}: dilation should be greater than zero, got dilation={dilation}")
    if groups <= 0:
        raise InputError(f"{op}: non-positive groups is not supported, got groups={groups}")
    if weight.shape[0] % groups:
        raise InputError(
            f"{op}: Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
            f"but got weight of size {list(weight.shape)} instead"
        )
    channels = input.shape[-d - 1]
    expected = weight.shape[0] if transposed else weight.shape[1] * groups
    if channels != expected:
        given = "transposed=1" if transposed else f"groups={groups}"
        raise InputError(
            f"{op}: Given {given}, weight of size {list(weight.shape)}, expected input{list(input.shape)} "
            f"to have {expected} channels, but got {channels} channels instead"
        )
    out_channels = weight.shape[1] * groups if transposed else weight.shape[0]
    if bias is not None and shape(bias) != (out_channels,):
        raise InputError(
            f"{op}: Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with "
            f"{out_channels} elements, but got bias of size {list(bias.shape)} instead"
        )


def _conv(op: str, d: int, input, weight, bias, stride, padding, dilation, groups, rule=None, rule_args=()) -> torch.Tensor:
    stride, dilation = _ntuple(op, "stride", stride, d), _ntuple(op, "dilation", dilation, d)
    _conv_checks(op, d, input, weight, bias, stride, dilation, groups, transposed=False)
    kernel = tuple(weight.shape[2:])
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * d
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise InputError(f"{op}: padding='same' is not supported for strided convolutions")
            padding, right = rules.conv.same_padding(kernel, dilation)
            extra = [r - p for p, r in zip(padding, right)]  # an even d(k−1): torch pads the odd one on the right
            if any(extra):
                input = pad(input, [x for e in reversed(extra) for x in (0, e)])
            padding = tuple(padding)
        else:
            raise InputError(f"{op}: Invalid padding string {padding!r}, should be one of ['valid', 'same']")
    else:
        padding = _ntuple(op, "padding", padding, d)
        if any(p < 0 for p in padding):
            raise InputError(f"{op}: negative padding is not supported, got padding={padding}")
    padded = [n + 2 * p for n, p in zip(input.shape[-d:], padding)]
    effective = [dil * (k - 1) + 1 for k, dil in zip(kernel, dilation)]
    if any(n < k for n, k in zip(padded, effective)):
        raise InputError(
            f"{op}: Calculated padded input size per channel: ({' x '.join(map(str, padded))}). "
            f"Kernel size: ({' x '.join(map(str, effective))}). Kernel size can't be greater than actual input size"
        )
    input, weight, bias = autocast_inputs(op, input.device, input, weight, bias)
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        _checks.same_dtype(op, input=input, weight=weight, bias=bias)
    # rule, rule_args: a learning-rule plugin's convolution rule and its arguments after groups
    return apply_rule(rule or rules.Convolution, input, weight, bias, stride, padding, dilation, groups, *rule_args)


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """z = W ⋆ a + b.  Input: (N, C_in, L) or (C_in, L); weight: (C_out, C_in/groups, k). Output: (N, C_out, L_out)."""
    return _conv("conv1d", 1, input, weight, bias, stride, padding, dilation, groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """z = W ⋆ a + b.  Input: (N, C_in, H, W) or (C_in, H, W); weight: (C_out, C_in/groups, kH, kW)."""
    return _conv("conv2d", 2, input, weight, bias, stride, padding, dilation, groups)


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """z = W ⋆ a + b.  Input: (N, C_in, D, H, W) or (C_in, D, H, W); weight: (C_out, C_in/groups, kD, kH, kW)."""
    return _conv("conv3d", 3, input, weight, bias, stride, padding, dilation, groups)


def _conv_transpose(op: str, d: int, input, weight, bias, stride, padding, output_padding, groups, dilation):
    if isinstance(padding, str):
        raise InputError(f"{op}: padding must be an int or a tuple of ints, got {padding!r} "
                         "('same' and 'valid' are for convolutions, not transposed ones)")
    stride, dilation = _ntuple(op, "stride", stride, d), _ntuple(op, "dilation", dilation, d)
    padding, output_padding = _ntuple(op, "padding", padding, d), _ntuple(op, "output_padding", output_padding, d)
    _conv_checks(op, d, input, weight, bias, stride, dilation, groups, transposed=True)
    if any(op_ >= s and op_ >= dil for op_, s, dil in zip(output_padding, stride, dilation)):
        raise InputError(f"{op}: output padding must be smaller than either stride or dilation, but got "
                         f"output_padding={output_padding}, stride={stride}, dilation={dilation}")
    out = [(n - 1) * s - 2 * p + dil * (k - 1) + op_ + 1 for n, s, p, dil, k, op_ in
           zip(input.shape[-d:], stride, padding, dilation, weight.shape[2:], output_padding)]
    if any(n <= 0 for n in out):
        raise InputError(f"{op}: Given input size per channel: ({' x '.join(map(str, input.shape[-d:]))}). "
                         f"Calculated output size per channel: ({' x '.join(map(str, out))}). Output size is too small")
    input, weight, bias = autocast_inputs(op, input.device, input, weight, bias)
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        _checks.same_dtype(op, input=input, weight=weight, bias=bias)
    return apply_rule(rules.ConvTranspose, input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """z = Wᵀ ⋆ a + b.  Input: (N, C_in, L) or (C_in, L); weight: (C_in, C_out/groups, k)."""
    return _conv_transpose("conv_transpose1d", 1, input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """z = Wᵀ ⋆ a + b.  Input: (N, C_in, H, W) or (C_in, H, W); weight: (C_in, C_out/groups, kH, kW)."""
    return _conv_transpose("conv_transpose2d", 2, input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """z = Wᵀ ⋆ a + b.  Input: (N, C_in, D, H, W) or (C_in, D, H, W); weight: (C_in, C_out/groups, kD, kH, kW)."""
    return _conv_transpose("conv_transpose3d", 3, input, weight, bias, stride, padding, output_padding, groups, dilation)


_PAD_MODES = ("constant", "reflect", "replicate", "circular")


def pad(input: torch.Tensor, pad: list[int], mode: str = "constant", value: float | None = None) -> torch.Tensor:
    """Pad the last len(pad)/2 dimensions (pad lists the last dimension first: left, right, ...)."""
    if mode not in _PAD_MODES:
        raise InputError(f"pad: mode must be one of {list(_PAD_MODES)}, got {mode!r}")
    pad = tuple(int(p) for p in pad)
    if len(pad) % 2:
        raise InputError(f"pad: Padding length must be divisible by 2, got pad={list(pad)}")
    if len(pad) // 2 > input.dim():
        raise InputError(f"pad: Padding length should be less than or equal to two times the input dimension "
                         f"but got padding length {len(pad)} and input of dimension {input.dim()}")
    if mode != "constant" and value is not None and value != 0:
        raise InputError(f'pad: Padding mode "{mode}" doesn\'t take in value argument')
    if mode in ("reflect", "replicate"):
        # autocast's names for the aten kernels F.pad dispatches to (circular is composite, not listed)
        op = f"{'reflection' if mode == 'reflect' else 'replication'}_pad{len(pad) // 2}d"
        (input,) = autocast_inputs(op, input.device, input)
    if mode != "constant":
        value = None
    return apply_rule(rules.Pad, input, pad, mode, value)
