"""Linear layer: z(l+1) = W(l) a(l) + b(l), in torch's layout z = a Wᵀ + b."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from manual_backprop import observe
from manual_backprop._amp import without_autocast
from manual_backprop.rules._apply import direct_backward


@direct_backward
class Linear(torch.autograd.Function):
    """z = a Wᵀ + b for a: (*, in), W: (out, in), b: (out,) or None.

    Backward, with δ = ∂J/∂z of shape (*, out) and every leading dimension
    flattened into one batch dimension n:

        ∂J/∂a = δ W                       the notes' W(l) δ(l+1), row by row
        ∂J/∂W = Σₙ δₙ aₙᵀ = δᵀ a          outer products summed over the batch
        ∂J/∂b = Σₙ δₙ

    Only the gradients autograd asks for are computed, and only the tensors they
    need are saved (a for ∂J/∂W, W for ∂J/∂a). While a tape or per-sample gradients
    watch the module (`observe`), a is kept too and backward reports δ and a.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, W, b):
        return F.linear(a, W, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, W, b = inputs
        need_a, need_W, _ = ctx.needs_input_grad
        ctx.call = call = observe.keep(ctx, W, b)
        if call is None:  # the common case, nobody watching: a for ∂J/∂W, W for ∂J/∂a
            ctx.save_for_backward(a if need_W else None, W if need_a else None)
        else:  # a watcher reads δ and a (and the output, when it asks)
            ctx.save_for_backward(a, W if need_a else None, *observe.output(ctx, output))

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        a, W, *output = ctx.saved_tensors
        need_a, need_W, need_b = ctx.needs_input_grad
        if ctx.call is not None:
            ctx.call.see(linear_seen(ctx.call, delta, a, *ctx.params, *output))
            need_W, need_b = observe.needs(ctx, need_W, need_b)  # book-keeping DP-SGD forms them clipped
        grad_a = delta @ W if need_a else None
        return grad_a, *weight_and_bias_grads(delta, a, need_W, need_b)


def weight_and_bias_grads(delta, a, need_W: bool, need_b: bool):
    """∂J/∂W = Σₙ δₙ aₙᵀ = δᵀ a and ∂J/∂b = Σₙ δₙ, summed over every leading dimension of δ: (*, out).

    Shared by every Linear-shaped rule (feedback alignment changes only ∂J/∂a).
    """
    if delta.dim() != 2:  # (*, out) -> (n, out)
        delta, a = delta.reshape(-1, delta.shape[-1]), None if a is None else a.reshape(-1, a.shape[-1])
    return (delta.T @ a if need_W else None), (delta.sum(0) if need_b else None)


def per_sample_linear_grads(delta, a, bias: bool):
    """Sample n's ∂J/∂W = Σₜ δₙₜ aₙₜᵀ and ∂J/∂b = Σₜ δₙₜ for δ: (N, *, out), a: (N, *, in)."""
    N = delta.shape[0]
    delta, a = delta.reshape(N, -1, delta.shape[-1]), a.reshape(N, -1, a.shape[-1])
    return delta.transpose(1, 2) @ a, (delta.sum(1) if bias else None)


def per_sample_linear_sq_norms(delta, a, bias: bool):
    """‖Σₜ δₙₜ aₙₜᵀ‖² (+ ‖Σₜ δₙₜ‖²) per sample n, without forming the (N, out, in) gradients.

    One position per sample: ‖δₙ aₙᵀ‖² = ‖δₙ‖²‖aₙ‖². T positions: ⟨δₙδₙᵀ, aₙaₙᵀ⟩ from two T×T Gram
    matrices, unless T² > out·in, where forming sample n's gradient is the smaller tensor.
    """
    N = delta.shape[0]
    delta, a = delta.reshape(N, -1, delta.shape[-1]), a.reshape(N, -1, a.shape[-1])
    T, out, inp = delta.shape[1], delta.shape[2], a.shape[2]
    if T == 1:
        sq = delta.square().sum((1, 2)) * a.square().sum((1, 2))
    elif T * T <= out * inp:
        sq = ((delta @ delta.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2))
    else:
        sq = (delta.transpose(1, 2) @ a).square().sum((1, 2))
    return sq + delta.sum(1).square().sum(1) if bias else sq


def linear_seen(call, delta, a, W, b, output=None, layer: str = ""):
    """What a Linear-shaped rule (ours, feedback alignment's, a fused MLP layer) reports to `observe`."""
    bias = b is not None
    return observe.Seen(
        call, delta, a, (W, b),
        per_sample=lambda d, x: per_sample_linear_grads(d, x, bias),
        sq_norms=lambda d, x: per_sample_linear_sq_norms(d, x, bias),
        grads=lambda d, x: weight_and_bias_grads(d, x, True, bias),
        output=output, layer=layer,
    )
