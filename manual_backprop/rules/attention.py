"""Scaled dot-product attention: two matrix products and a softmax, each with its own δ.

For queries Q: (*, L, E), keys K: (*, S, E) and values V: (*, S, Ev):

    S = Q Kᵀ · scale (+ mask)        scores, (*, L, S)
    P = softmax(S) along S           each query's weights over the keys
    O = P V                          (*, L, Ev)

Backward, with δ = ∂J/∂O. The two products are Linear layers without bias (P is the
input and V the weight of the second, Q the input and K the weight of the first),
and the softmax's Jacobian diag(p) − p pᵀ is applied row by row:

    ∂J/∂V = Pᵀ δ
    ∂J/∂P = δ Vᵀ
    ∂J/∂S = P ⊙ (∂J/∂P − rowsum(∂J/∂P ⊙ P))
    ∂J/∂Q = ∂J/∂S K · scale
    ∂J/∂K = ∂J/∂Sᵀ Q · scale

P is kept for backward, so memory is O(L·S) per head (torch's fused kernels keep
O(L) and recompute P instead).
"""

from __future__ import annotations

import torch

from manual_backprop._amp import without_autocast
from manual_backprop.rules.dropout import scaled_mask


def _expand_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention: key/value head h serves query heads h·g … h·g + g − 1 (repeat_interleave)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=-3)


def _sum_heads(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """The adjoint of `_expand_heads`: each key/value head gets the sum over the query heads it served."""
    return grad if groups == 1 else grad.unflatten(-3, (-1, groups)).sum(-3)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient over the dimensions an input of `shape` was broadcast along."""
    return grad if grad.shape == shape else grad.sum_to_size(shape)


class Attention(torch.autograd.Function):
    """O, P = attention(Q, K, V, mask, keep, dropout_p, scale, is_causal, groups, safe).

    mask: None, bool (True = may attend) or float (added to S), broadcast to (*, L, S).
    keep: None or the bool dropout mask; then O = (P ⊙ keep / (1 − dropout_p)) V.
    groups: query heads per key/value head (grouped-query attention), 1 otherwise.
    safe: rows whose scores are all −inf (fully masked) give P = 0, as torch's
    scaled_dot_product_attention does; otherwise they give NaN, as a plain softmax does.

    Returns O and P (before dropout); P's own gradient, if used, is added to ∂J/∂P.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, mask, keep, dropout_p, scale, is_causal, groups, safe):
        k, v = _expand_heads(k, groups), _expand_heads(v, groups)
        S = (q @ k.transpose(-2, -1)).mul_(scale)  # in place: S is ours (forward runs without autograd)
        L, S_len = S.shape[-2], S.shape[-1]
        if is_causal:
            causal = torch.ones(L, S_len, dtype=torch.bool, device=S.device).tril()
            S = S.masked_fill_(~causal, float("-inf"))
        if mask is not None:
            if torch.broadcast_shapes(S.shape, mask.shape) != S.shape:  # the mask adds batch dimensions
                S = S.expand(torch.broadcast_shapes(S.shape, mask.shape)).clone()
            S = S.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else S.add_(mask)
        P = torch.softmax(S, dim=-1)
        if safe and (mask is not None):
            P = P.masked_fill((S == float("-inf")).all(-1, keepdim=True), 0.0)
        P_dropped = P if keep is None else P * scaled_mask(keep, dropout_p, P.dtype)
        return P_dropped @ v, P

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, keep, dropout_p, scale, is_causal, groups, safe = inputs
        ctx.set_materialize_grads(False)
        ctx.dropout_p, ctx.scale, ctx.groups = dropout_p, scale, groups
        ctx.shapes = q.shape, k.shape, v.shape, None if mask is None else mask.shape
        need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
        need_S = need_q or need_k or need_mask  # ∂S needs V (for ∂P = δVᵀ)
        ctx.save_for_backward(q if need_k else None, k if need_q else None, v if need_S else None, output[1], keep)

    @staticmethod
    @without_autocast
    def backward(ctx, delta, delta_P):
        q, k, v, P, keep = ctx.saved_tensors
        need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
        scale, groups = ctx.scale, ctx.groups
        q_shape, k_shape, v_shape, mask_shape = ctx.shapes
        # m / (1 − p) in P's dtype: a bool mask times a Python float would be float32 in a float64 backward
        dropout = None if keep is None else scaled_mask(keep, ctx.dropout_p, P.dtype)
        grad_q = grad_k = grad_v = grad_mask = None
        if need_v and delta is not None:
            P_dropped = P if dropout is None else P * dropout
            grad_v = _sum_to(_sum_heads(P_dropped.transpose(-2, -1) @ delta, groups), v_shape)  # Pᵀ δ
        if need_q or need_k or need_mask:
            if delta is None and delta_P is None:
                return None, None, None, None, None, None, None, None, None, None
            if delta is None:
                grad_S = delta_P * P
            else:
                grad_P = delta @ _expand_heads(v, groups).transpose(-2, -1)  # δ Vᵀ (through the dropout mask, if any)
                if dropout is not None:
                    grad_P = grad_P.mul_(dropout)
                if delta_P is not None:
                    grad_P = grad_P.add_(delta_P)
                grad_S = grad_P.mul_(P)
            # ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)): softmax's Jacobian, row by row; in place on our own
            # intermediate (autograd still tracks it when backward is differentiated again)
            grad_S = grad_S.sub_(P * grad_S.sum(-1, keepdim=True))  # (addcmul_ has no vmap batching rule)
            if need_q:
                grad_q = _sum_to(grad_S @ _expand_heads(k, groups) * scale, q_shape)  # ∂S K · scale
            if need_k:
                grad_k = _sum_to(_sum_heads(grad_S.transpose(-2, -1) @ q * scale, groups), k_shape)  # ∂Sᵀ Q · scale
            if need_mask:
                grad_mask = grad_S.sum_to_size(mask_shape)
        return grad_q, grad_k, grad_v, grad_mask, None, None, None, None, None, None
