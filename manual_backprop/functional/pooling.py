"""Pooling on the rules of `rules.pooling`: max and average pooling over 1, 2 or 3 spatial dimensions, and
their adaptive forms (output size given, windows derived as torch derives them)."""

from __future__ import annotations

import torch

from manual_backprop import rules
from manual_backprop._amp import autocast_inputs
from manual_backprop._checks import InputError
from manual_backprop.functional._common import _ntuple, _spatial_input
from manual_backprop.rules._apply import apply_rule


def _pool_args(op: str, d: int, input, kernel_size, stride, padding):
    _spatial_input(op, input, d)
    kernel_size = _ntuple(op, "kernel_size", kernel_size, d)
    stride = kernel_size if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _ntuple(op, "stride", stride, d)
    return kernel_size, stride, _ntuple(op, "padding", padding, d)


def _max_pool(op, d, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    kernel_size, stride, padding = _pool_args(op, d, input, kernel_size, stride, padding)
    dilation = _ntuple(op, "dilation", dilation, d)
    # autocast lists max_pool3d (fp32 on cpu), not max_pool3d_with_indices
    (input,) = autocast_inputs(op + ("_with_indices" if return_indices else ""), input.device, input)
    z, indices = apply_rule(rules.MaxPool, input, kernel_size, stride, padding, dilation, ceil_mode)
    return (z, indices) if return_indices else z


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """z = max over each window.  Input: (N, C, L) or (C, L). With return_indices, also the argmax."""
    return _max_pool("max_pool1d", 1, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """z = max over each window.  Input: (N, C, H, W) or (C, H, W). With return_indices, also the argmax."""
    return _max_pool("max_pool2d", 2, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool3d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """z = max over each window.  Input: (N, C, D, H, W) or (C, D, H, W). With return_indices, also the argmax."""
    return _max_pool("max_pool3d", 3, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def _avg_pool(op, d, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    kernel_size, stride, padding = _pool_args(op, d, input, kernel_size, stride, padding)
    (input,) = autocast_inputs(op, input.device, input)
    return apply_rule(rules.AvgPool, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """z = mean over each window.  Input: (N, C, L) or (C, L)."""
    return _avg_pool("avg_pool1d", 1, input, kernel_size, stride, padding, ceil_mode, count_include_pad, None)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    """z = Σ window / divisor.  Input: (N, C, H, W) or (C, H, W)."""
    return _avg_pool("avg_pool2d", 2, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def avg_pool3d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    """z = Σ window / divisor.  Input: (N, C, D, H, W) or (C, D, H, W)."""
    return _avg_pool("avg_pool3d", 3, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _adaptive_size(op: str, d: int, input, output_size) -> tuple[int, ...]:
    _spatial_input(op, input, d)
    if isinstance(output_size, int):
        output_size = (output_size,) * d
    output_size = tuple(output_size)
    if len(output_size) == 1 and d > 1:
        output_size = output_size * d
    if len(output_size) != d:
        raise InputError(f"{op}: output_size must be an int or a tuple of {d} ints (or None), got {output_size}")
    return tuple(n if o is None else int(o) for n, o in zip(input.shape[-d:], output_size))


def adaptive_avg_pool1d(input, output_size) -> torch.Tensor:
    """z = mean over each of output_size windows.  Input: (N, C, L) or (C, L)."""
    size = _adaptive_size("adaptive_avg_pool1d", 1, input, output_size)
    return apply_rule(rules.AdaptiveAvgPool, input, size)


def adaptive_avg_pool2d(input: torch.Tensor, output_size) -> torch.Tensor:
    """z = mean over each of output_size windows.  Input: (N, C, H, W) or (C, H, W)."""
    size = _adaptive_size("adaptive_avg_pool2d", 2, input, output_size)
    return apply_rule(rules.AdaptiveAvgPool, input, size)


def adaptive_avg_pool3d(input: torch.Tensor, output_size) -> torch.Tensor:
    """z = mean over each of output_size windows.  Input: (N, C, D, H, W) or (C, D, H, W)."""
    size = _adaptive_size("adaptive_avg_pool3d", 3, input, output_size)
    (input,) = autocast_inputs("adaptive_avg_pool3d", input.device, input)
    return apply_rule(rules.AdaptiveAvgPool, input, size)


def _adaptive_max_pool(op, d, input, output_size, return_indices):
    size = _adaptive_size(op, d, input, output_size)
    (input,) = autocast_inputs(op, input.device, input)
    z, indices = apply_rule(rules.AdaptiveMaxPool, input, size)
    return (z, indices) if return_indices else z


def adaptive_max_pool1d(input, output_size, return_indices=False):
    """z = max over each of output_size windows.  Input: (N, C, L) or (C, L)."""
    return _adaptive_max_pool("adaptive_max_pool1d", 1, input, output_size, return_indices)


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """z = max over each of output_size windows.  Input: (N, C, H, W) or (C, H, W)."""
    return _adaptive_max_pool("adaptive_max_pool2d", 2, input, output_size, return_indices)


def adaptive_max_pool3d(input, output_size, return_indices=False):
    """z = max over each of output_size windows.  Input: (N, C, D, H, W) or (C, D, H, W)."""
    return _adaptive_max_pool("adaptive_max_pool3d", 3, input, output_size, return_indices)
