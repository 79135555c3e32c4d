"""Pooling: each output summarises one window of its channel; δ goes back to the window.

    max pooling:      z = max over the window           ∂J/∂a = δ at the argmax, 0 elsewhere
                                                        (`route_to_argmax`: overlapping windows add)
    average pooling:  z = Σ window / divisor            ∂J/∂a = Σ over the windows holding each
                                                        element of δ / divisor (`spread_over_windows`)

Both are linear in δ, and so are their backwards, which double backward differentiates.
Average pooling is separable: along each spatial dimension an output o averages the
inputs of its window [start(o), end(o)) with a per-dimension divisor, and the full
divisor is their product (torch's count_include_pad rule is a product too). So one
adjoint serves AvgPool and AdaptiveAvgPool alike: δ times, along each spatial dimension,
the matrix M (out × in) with M[o, l] = 1/divisor(o) on the window, 0 elsewhere.
Shapes: a: (N, C, *in) or (C, *in); z, δ: like a with *out; d = 1, 2 or 3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from manual_backprop._amp import without_autocast

_MAX_POOL = {1: F.max_pool1d_with_indices, 2: F.max_pool2d_with_indices, 3: F.max_pool3d_with_indices}
_ADAPTIVE_MAX_POOL = {1: F.adaptive_max_pool1d_with_indices, 2: F.adaptive_max_pool2d_with_indices,
                      3: F.adaptive_max_pool3d_with_indices}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADAPTIVE_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


# ------------------------------------------------------------------ max


def route_to_argmax(delta: torch.Tensor, indices: torch.Tensor, a_shape, d: int) -> torch.Tensor:
    """∂J/∂a: each δ goes to the input element its window's maximum came from.

    `indices` (as torch's max pools return them) number each channel's input positions,
    flattened over the d spatial dimensions; δ is scatter-added there into zeros, so an
    element that is the maximum of several windows collects all their δ.
    """
    lead = tuple(a_shape[: len(a_shape) - d])  # (N, C) or (C,)
    grad = delta.new_zeros(*lead, math.prod(a_shape[len(lead):]))
    return grad.scatter_add(-1, indices.flatten(len(lead)), delta.flatten(len(lead))).view(a_shape)


class MaxPool(torch.autograd.Function):
    """z = max over each window (kernel, stride, padding, dilation, ceil_mode); also returns the argmax
    indices.  ∂J/∂a = δ routed to the argmax (`route_to_argmax`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, kernel_size, stride, padding, dilation, ceil_mode):
        return _MAX_POOL[len(kernel_size)](a, kernel_size, stride, padding, dilation, ceil_mode, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a = inputs[0]
        ctx.a_shape, ctx.d = tuple(a.shape), len(inputs[1])
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    @staticmethod
    @without_autocast
    def backward(ctx, delta, _):
        (indices,) = ctx.saved_tensors
        return route_to_argmax(delta, indices, ctx.a_shape, ctx.d), None, None, None, None, None


class AdaptiveMaxPool(torch.autograd.Function):
    """z = max over each adaptive window (output size fixed); also returns the argmax indices.
    ∂J/∂a = δ routed to the argmax (`route_to_argmax`), as for MaxPool."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, output_size):
        return _ADAPTIVE_MAX_POOL[len(output_size)](a, output_size, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.a_shape, ctx.d = tuple(inputs[0].shape), len(inputs[1])
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    @staticmethod
    @without_autocast
    def backward(ctx, delta, _):
        (indices,) = ctx.saved_tensors
        return route_to_argmax(delta, indices, ctx.a_shape, ctx.d), None


# ------------------------------------------------------------------ average


def window_matrix(size: int, starts: torch.Tensor, ends: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """M (out × size) for one spatial dimension: M[o, l] = weights[o] for starts[o] ≤ l < ends[o], else 0."""
    l = torch.arange(size, device=starts.device)
    inside = (l >= starts[:, None]) & (l < ends[:, None])
    return inside.to(weights.dtype) * weights[:, None]


def spread_over_windows(delta: torch.Tensor, matrices: list[torch.Tensor]) -> torch.Tensor:
    """∂J/∂a = Mᵀ δ for a separable average pool: along each of the last len(matrices) dimensions,
    every output's δ (already divided by its window's divisor through M) goes to each element of
    its window, and an element in several windows collects them all."""
    grad = delta
    for j, M in enumerate(matrices):
        dim = delta.dim() - len(matrices) + j
        grad = (grad.movedim(dim, -1) @ M).movedim(-1, dim)
    return grad


def avg_pool_matrices(a_size, out_size, kernel_size, stride, padding, count_include_pad, divisor_override,
                      dtype, device) -> list[torch.Tensor]:
    """The per-dimension window matrices of AvgPool, with torch's divisor:
    window o starts at o·s − p and ends k later, clipped to the padded input (that count is the
    divisor with count_include_pad) and to the input itself (the count without); divisor_override
    replaces the product of the counts."""
    matrices = []
    for n, o, k, s, p in zip(a_size, out_size, kernel_size, stride, padding):
        starts = torch.arange(o, device=device) * s - p
        ends = (starts + k).clamp(max=n + p)
        if divisor_override:
            counts = torch.ones(o, device=device)
        elif count_include_pad:
            counts = (ends - starts).to(torch.float64)
        else:
            counts = (ends.clamp(max=n) - starts.clamp(min=0)).clamp(min=1).to(torch.float64)
        matrices.append(window_matrix(n, starts, ends, (1 / counts).to(dtype)))
    if divisor_override:
        matrices[0] = matrices[0] / divisor_override
    return matrices


def adaptive_avg_pool_matrices(a_size, out_size, dtype, device) -> list[torch.Tensor]:
    """The per-dimension window matrices of AdaptiveAvgPool: window o is [⌊o·n/O⌋, ⌈(o+1)·n/O⌉)."""
    matrices = []
    for n, o in zip(a_size, out_size):
        i = torch.arange(o, device=device)
        starts, ends = (i * n).div(o, rounding_mode="floor"), ((i + 1) * n + o - 1).div(o, rounding_mode="floor")
        matrices.append(window_matrix(n, starts, ends, (1 / (ends - starts).to(torch.float64)).to(dtype)))
    return matrices


class AvgPool(torch.autograd.Function):
    """z = Σ window / divisor (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override).
    ∂J/∂a = Mᵀ δ, δ / divisor spread over each window (`spread_over_windows`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        d = len(kernel_size)
        if d == 1:  # avg_pool1d takes no divisor_override
            return F.avg_pool1d(a, kernel_size, stride, padding, ceil_mode, count_include_pad)
        return _AVG_POOL[d](a, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, kernel_size, stride, padding, _, count_include_pad, divisor_override = inputs
        ctx.config = kernel_size, stride, padding, count_include_pad, divisor_override
        ctx.a_size = tuple(a.shape[a.dim() - len(kernel_size):])

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        kernel_size, stride, padding, count_include_pad, divisor_override = ctx.config
        out_size = delta.shape[delta.dim() - len(kernel_size):]
        M = avg_pool_matrices(ctx.a_size, out_size, kernel_size, stride, padding, count_include_pad,
                              divisor_override, delta.dtype, delta.device)
        return spread_over_windows(delta, M), None, None, None, None, None, None


class AdaptiveAvgPool(torch.autograd.Function):
    """z = mean over each adaptive window (output size fixed).  ∂J/∂a = Mᵀ δ (`spread_over_windows`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, output_size):
        return _ADAPTIVE_AVG_POOL[len(output_size)](a, output_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, output_size = inputs
        ctx.a_size = tuple(a.shape[a.dim() - len(output_size):])

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        d = len(ctx.a_size)
        M = adaptive_avg_pool_matrices(ctx.a_size, delta.shape[delta.dim() - d:], delta.dtype, delta.device)
        return spread_over_windows(delta, M), None
