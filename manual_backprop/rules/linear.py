"""Linear layer: z(l+1) = W(l) a(l) + b(l), in torch's layout z = a Wᵀ + b."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from manual_backprop._amp import without_autocast


class Linear(torch.autograd.Function):
    """z = a Wᵀ + b for a: (*, in), W: (out, in), b: (out,) or None.

    Backward, with δ = ∂J/∂z of shape (*, out) and every leading dimension
    flattened into one batch dimension n:

        ∂J/∂a = δ W                       the notes' W(l) δ(l+1), row by row
        ∂J/∂W = Σₙ δₙ aₙᵀ = δᵀ a          outer products summed over the batch
        ∂J/∂b = Σₙ δₙ

    Only the gradients autograd asks for are computed, and only the tensors they
    need are saved (a for ∂J/∂W, W for ∂J/∂a).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, W, b):
        return F.linear(a, W, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, W, b = inputs
        need_a, need_W, _ = ctx.needs_input_grad
        ctx.save_for_backward(a if need_W else None, W if need_a else None)

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        a, W = ctx.saved_tensors
        need_a, need_W, need_b = ctx.needs_input_grad
        grad_a = delta @ W if need_a else None
        return grad_a, *weight_and_bias_grads(delta, a, need_W, need_b)


def weight_and_bias_grads(delta, a, need_W: bool, need_b: bool):
    """∂J/∂W = Σₙ δₙ aₙᵀ = δᵀ a and ∂J/∂b = Σₙ δₙ, summed over every leading dimension of δ: (*, out).

    Shared by every Linear-shaped rule (feedback alignment changes only ∂J/∂a).
    """
    if delta.dim() != 2:  # (*, out) -> (n, out)
        delta, a = delta.reshape(-1, delta.shape[-1]), None if a is None else a.reshape(-1, a.shape[-1])
    return (delta.T @ a if need_W else None), (delta.sum(0) if need_b else None)
