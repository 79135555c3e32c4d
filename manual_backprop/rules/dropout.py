"""Dropout: a = z ⊙ m / (1 − p), with m a Bernoulli(1 − p) mask drawn in forward;  δ_z = δ ⊙ m / (1 − p).

The mask is drawn by the caller (`manual_backprop.functional.dropout*`) from torch's global
RNG, exactly as torch's CPU kernel draws it (`bernoulli_(1 − p)` on a tensor of the mask's
shape), so a seed reproduces torch's mask on CPU. It reaches the rule as a bool tensor and is
all that backward keeps: one byte per element (per channel for Dropout1d/2d/3d, whose mask
has shape (N, C, 1, …) and broadcasts), where torch's CPU kernel keeps a full floating tensor.
"""

from __future__ import annotations

import torch

from manual_backprop._amp import without_autocast


def scaled_mask(mask: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """m / (1 − p) in `dtype` (0 everywhere for p = 1, as torch: the input times zero)."""
    m = mask.to(dtype)
    return m if p == 0 else m.mul_(0.0) if p == 1 else m.div_(1 - p)


class Dropout(torch.autograd.Function):
    """a = z ⊙ m / (1 − p);   backward: δ ⊙ m / (1 − p)   (the mask is constant: no gradient)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z, mask, p):
        return z * scaled_mask(mask, p, z.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, mask, ctx.p = inputs
        ctx.save_for_backward(mask)

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        (mask,) = ctx.saved_tensors
        return delta * scaled_mask(mask, ctx.p, delta.dtype), None, None


class InplaceDropout(torch.autograd.Function):
    """`inplace=True`: z is overwritten with z ⊙ m / (1 − p); the same backward.

    Old-style (ctx in forward) because `mark_dirty` needs it; torch.func.vmap wants inplace=False.
    """

    @staticmethod
    def forward(ctx, z, mask, p):
        z.mul_(scaled_mask(mask, p, z.dtype))
        ctx.mark_dirty(z)
        ctx.p = p
        ctx.save_for_backward(mask)
        return z

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        (mask,) = ctx.saved_tensors
        return delta * scaled_mask(mask, ctx.p, delta.dtype), None, None
