"""Embedding: a lookup, z[n] = E[x[n]], whose gradient adds δ back into the rows looked up.

An embedding is a Linear layer applied to one-hot inputs: with a[n] = onehot(x[n]),
z[n] = Eᵀ a[n] picks row x[n] of E (torch's weight, num_embeddings × embedding_dim).
The notes' ∂J/∂W = Σₙ δₙ aₙᵀ then becomes, row by row,

    ∂J/∂E[i] = Σ_{n : x[n] = i} δₙ           (index_add of δ into the rows looked up)

and no gradient flows to the integer indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from manual_backprop import observe
from manual_backprop._amp import without_autocast


class Embedding(torch.autograd.Function):
    """z = E[x] for integer x: (*), E: (num_embeddings, embedding_dim); z: (*, embedding_dim).

    Backward, with δ = ∂J/∂z of shape (*, embedding_dim):

        ∂J/∂E[i] = Σ_{n : x[n] = i} δₙ                 (`embedding_weight_grad`)

    with the rows of padding_idx left at zero and, for scale_grad_by_freq, each δₙ
    divided by how often x[n] occurs in x.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, E, padding_idx, scale_grad_by_freq):
        return F.embedding(x, E)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, E, padding_idx, scale_grad_by_freq = inputs
        ctx.num_embeddings = E.shape[0]
        ctx.padding_idx, ctx.scale_grad_by_freq = padding_idx, scale_grad_by_freq
        ctx.call = observe.keep(ctx, E)
        ctx.save_for_backward(x, *observe.output(ctx, output))

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        x, *output = ctx.saved_tensors
        need_E = ctx.needs_input_grad[1]
        if ctx.call is not None:
            ctx.call.see(embedding_seen(ctx, delta, x, *output))
            (need_E,) = observe.needs(ctx, need_E)  # book-keeping DP-SGD forms it clipped
        grad_E = None
        if need_E:
            grad_E = embedding_weight_grad(delta, x, ctx.num_embeddings, ctx.padding_idx, ctx.scale_grad_by_freq)
        return None, grad_E, None, None


def embedding_weight_grad(delta, x, num_embeddings: int, padding_idx: int | None = None,
                          scale_grad_by_freq: bool = False):
    """∂J/∂E = Σₙ onehot(x[n]) δₙᵀ: δₙ added into row x[n], summed over every position of x.

    delta: (*, embedding_dim), x: (*) integer indices. Rows of `padding_idx` get zero;
    with `scale_grad_by_freq`, δₙ is divided by the number of times x[n] occurs in x.
    """
    x = x.reshape(-1)
    delta = delta.reshape(x.shape[0], delta.shape[-1])
    if scale_grad_by_freq:
        counts = torch.bincount(x, minlength=num_embeddings)
        delta = delta / counts[x].unsqueeze(1).to(delta.dtype)
    if padding_idx is not None:
        delta = delta * (x != padding_idx).unsqueeze(1).to(delta.dtype)
    grad_E = delta.new_zeros(num_embeddings, delta.shape[1])
    return grad_E.index_add(0, x, delta)


def per_sample_embedding_grads(delta, x, num_embeddings: int, padding_idx: int | None = None):
    """Sample n's ∂J/∂E = Σₜ onehot(xₙₜ) δₙₜᵀ for x: (N, *), δ: (N, *, dim): (N, num_embeddings, dim),
    one index_add into N stacked copies of E's shape (row xₙₜ of copy n)."""
    N = x.shape[0]
    x, delta = x.reshape(N, -1), delta.reshape(N, -1, delta.shape[-1])
    if padding_idx is not None:
        delta = delta * (x != padding_idx).unsqueeze(2).to(delta.dtype)
    rows = (x + num_embeddings * torch.arange(N, device=x.device).unsqueeze(1)).reshape(-1)
    grad = delta.new_zeros(N * num_embeddings, delta.shape[-1]).index_add(0, rows, delta.reshape(-1, delta.shape[-1]))
    return grad.view(N, num_embeddings, -1)


def per_sample_embedding_sq_norms(delta, x, padding_idx: int | None = None):
    """‖sample n's ∂J/∂E‖² = Σ_{t,t'} [xₙₜ = xₙₜ'] δₙₜ·δₙₜ' without forming it: the T×T Gram matrix of δ,
    kept where two positions look up the same row (rows are orthogonal: onehot(i)·onehot(j) = [i = j])."""
    N = x.shape[0]
    x, delta = x.reshape(N, -1), delta.reshape(N, -1, delta.shape[-1])
    if padding_idx is not None:
        delta = delta * (x != padding_idx).unsqueeze(2).to(delta.dtype)
    same = (x.unsqueeze(2) == x.unsqueeze(1)).to(delta.dtype)
    return ((delta @ delta.transpose(1, 2)) * same).sum((1, 2))


def embedding_seen(ctx, delta, x, output=None):
    """What the Embedding rule reports to `observe`: δ, the indices x as a, and its per-sample functions
    (scale_grad_by_freq divides by counts over the whole batch: that mixes samples)."""
    V, padding_idx = ctx.num_embeddings, ctx.padding_idx
    if ctx.scale_grad_by_freq:
        refuse = observe.mixes_samples(
            "embedding with scale_grad_by_freq divides each δ by its index's count over the whole batch, "
            "which mixes samples; it has no per-sample gradients"
        )
        return observe.Seen(ctx.call, delta, x, ctx.params, refuse, refuse, output=output)
    return observe.Seen(
        ctx.call, delta, x, ctx.params,
        per_sample=lambda d, a: (per_sample_embedding_grads(d, a, V, padding_idx),),
        sq_norms=lambda d, a: per_sample_embedding_sq_norms(d, a, padding_idx),
        grads=lambda d, a: (embedding_weight_grad(d, a, V, padding_idx),),
        output=output,
    )
