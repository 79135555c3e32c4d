"""Attention on `rules.Attention`: scaled dot-product attention (masks, causal, dropout, grouped-query), the
same returning its weights, and torch's multi-head attention built from it and the linear rule."""

from __future__ import annotations

import math

import torch

from manual_backprop import _checks, observe, rules
from manual_backprop._amp import autocast_inputs
from manual_backprop._checks import InputError, shape
from manual_backprop.functional.linear import linear
from manual_backprop.rules._apply import apply_rule


def attention_with_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    safe: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`scaled_dot_product_attention` that also returns the weights P = softmax(S) (after dropout, if any).

    Not in torch.nn.functional: MultiheadAttention's need_weights=True needs P, and a plain
    softmax there (`safe=False`) gives NaN for a fully masked row, as torch's does.
    """
    op = "scaled_dot_product_attention"
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise InputError(
            f"{op}: query, key and value must have at least 2 dimensions (*, L, E), got shapes "
            f"{shape(query)}, {shape(key)}, {shape(value)}"
        )
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise InputError(
            f"{op}: query (*, L, E), key (*, S, E) and value (*, S, Ev) disagree: got shapes "
            f"{shape(query)}, {shape(key)}, {shape(value)}"
        )
    if not 0.0 <= dropout_p <= 1.0:
        raise InputError(f"{op}: dropout_p must lie in [0, 1], got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise InputError(f"{op}: an explicit attn_mask should not be set when is_causal=True")
    groups = 1
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        heads_q, heads_kv = query.shape[-3], key.shape[-3]
        if key.dim() < 3 or value.shape[-3] != heads_kv or heads_kv == 0 or heads_q % heads_kv:
            raise InputError(
                f"{op}: enable_gqa needs the query heads ({heads_q}) to be a multiple of the key and value "
                f"heads, got shapes {shape(query)}, {shape(key)}, {shape(value)}"
            )
        groups = heads_q // heads_kv
    query, key, value, attn_mask = autocast_inputs(op, query.device, query, key, value, attn_mask)
    if not (query.dtype == key.dtype == value.dtype):
        _checks.same_dtype(op, query=query, key=key, value=value)
    _checks.floating(op, "query", query)
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, query.dtype):
        raise InputError(f"{op}: attn_mask must be bool or match the query's dtype {query.dtype}, got {attn_mask.dtype}")
    batch = query.shape[:-2] if groups == 1 else query.shape[:-3] + (query.shape[-3],)
    key_batch = key.shape[:-2] if groups == 1 else key.shape[:-3] + (query.shape[-3],)
    try:
        weights_shape = (*torch.broadcast_shapes(batch, key_batch), query.shape[-2], key.shape[-2])
        if attn_mask is not None:
            torch.broadcast_shapes(attn_mask.shape, weights_shape)
    except RuntimeError:
        raise InputError(
            f"{op}: shapes do not broadcast: query {shape(query)}, key {shape(key)}, value {shape(value)}"
            + ("" if attn_mask is None else f", attn_mask {shape(attn_mask)}")
        ) from None
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0
    keep = None
    if dropout_p > 0.0:  # drawn as torch's dropout draws it: bernoulli(1 − p) on a tensor shaped like P
        keep = torch.empty(weights_shape, dtype=query.dtype, device=query.device).bernoulli_(1 - dropout_p).bool()
    O, P = apply_rule(rules.Attention, query, key, value, attn_mask, keep, dropout_p, scale, is_causal, groups, safe)
    if keep is not None:  # the weights O was computed with, as torch returns them
        P = P * rules.dropout.scaled_mask(keep, dropout_p, P.dtype)
    return O, P


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """O = softmax(Q Kᵀ · scale + mask) V.  Query: (*, L, E); key: (*, S, E); value: (*, S, Ev). Output: (*, L, Ev).

    A query row that may attend to no key (fully masked) gives zeros, as torch does.
    """
    O, _ = attention_with_weights(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return O


def multi_head_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: torch.Tensor | None,
    in_proj_bias: torch.Tensor | None,
    bias_k: torch.Tensor | None,
    bias_v: torch.Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    training: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: torch.Tensor | None = None,
    k_proj_weight: torch.Tensor | None = None,
    v_proj_weight: torch.Tensor | None = None,
    static_k: torch.Tensor | None = None,
    static_v: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch's multi-head attention, on our linear and attention rules.  Query: (L, N, E) or (L, E);
    key, value: (S, N, E_k), (S, N, E_v). Output: (L, N, E), and the weights (N, L, S) averaged over
    heads (or (N, H, L, S)) when need_weights.

    Same steps and argument checks as torch.nn.functional.multi_head_attention_forward (its mask
    helpers are reused, so masks and errors are torch's): in-projection (z = a Wᵀ + b per head
    group), attention per head, out-projection.
    """
    TF = torch.nn.functional
    is_batched = TF._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    key_padding_mask = TF._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=TF._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise InputError(
            "multi_head_attention_forward: need attn_mask if specifying the is_causal hint "
            "(torch.nn.Transformer.generate_square_subsequent_mask makes one)"
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # the hint alone: attention applies the causal mask itself
    else:
        attn_mask = TF._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype,
            check_other=False,
        )
        if key_padding_mask is not None:
            is_causal = False  # merged with the padding mask, it is no longer causal
    if embed_dim != embed_dim_to_check:
        raise InputError(f"multi_head_attention_forward: expected embedding dimension {embed_dim_to_check}, got {embed_dim}")
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise InputError(f"multi_head_attention_forward: embed_dim {embed_dim} not divisible by num_heads {num_heads}")

    observe.samples_in(1)  # every Linear below sees (L, N, E): the samples lie along dim 1
    # in-projection: one Linear per packed weight block
    if not use_separate_proj_weight:
        W, b = in_proj_weight, in_proj_bias
        if key is value and query is key:  # self-attention: one product with the whole packed weight
            q, k, v = linear(query, W, b).chunk(3, dim=-1)
        elif key is value:
            W_q, W_kv = W.split([embed_dim, 2 * embed_dim])
            b_q, b_kv = (None, None) if b is None else b.split([embed_dim, 2 * embed_dim])
            q = linear(query, W_q, b_q)
            k, v = linear(key, W_kv, b_kv).chunk(2, dim=-1)
        else:
            b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
            W_q, W_k, W_v = W.chunk(3)
            q, k, v = linear(query, W_q, b_q), linear(key, W_k, b_k), linear(value, W_v, b_v)
    else:
        b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = linear(query, q_proj_weight, b_q), linear(key, k_proj_weight, b_k), linear(value, v_proj_weight, b_v)

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, key.shape[0]):
                raise InputError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, key.shape[0])}."
                )
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, key.shape[0]):
                raise InputError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                    f"{(bsz * num_heads, tgt_len, key.shape[0])}."
                )
        else:
            raise InputError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    pad = TF.pad
    if bias_k is not None and bias_v is not None:  # one learned key/value appended to every sequence
        if static_k is not None or static_v is not None:
            raise InputError("multi_head_attention_forward: bias cannot be added to static key or value")
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        attn_mask = None if attn_mask is None else pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else pad(key_padding_mask, (0, 1))
    elif (bias_k is None) != (bias_v is None):
        raise InputError("multi_head_attention_forward: bias_k and bias_v must both be set or both be None")

    # heads as views: (L, N, E) -> (N, H, L, E/H), no copy (static keys/values come as (N·H, S, E/H))
    def heads(t):
        return t.unflatten(-1, (num_heads, head_dim)).permute(1, 2, 0, 3)

    q = heads(q)
    k = heads(k) if static_k is None else static_k.view(bsz, num_heads, -1, head_dim)
    v = heads(v) if static_v is None else static_v.view(bsz, num_heads, -1, head_dim)
    if add_zero_attn:  # one all-zero key/value appended
        zeros = torch.zeros((bsz, num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros.to(v.dtype)], dim=2)
        attn_mask = None if attn_mask is None else pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else pad(key_padding_mask, (0, 1))
    src_len = k.shape[2]
    if attn_mask is not None:  # (1 or N·H, L, S) -> (1 or N, 1 or H, L, S)
        attn_mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.view(bsz, num_heads, -1, src_len)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, src_len):
            raise InputError(
                f"multi_head_attention_forward: key_padding_mask must have shape {(bsz, src_len)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0

    # attention per head; with need_weights a plain softmax, as torch (NaN for a fully masked row)
    attn_output, weights = attention_with_weights(
        q, k, v, attn_mask, dropout_p, is_causal and attn_mask is None, safe=not need_weights
    )
    attn_output = attn_output.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)  # (L, N, E): samples stay apart
    attn_output = linear(attn_output, out_proj_weight, out_proj_bias)
    if not need_weights:
        return (attn_output if is_batched else attn_output.squeeze(1)), None
    if average_attn_weights:
        weights = weights.mean(dim=1)
    if not is_batched:
        attn_output, weights = attn_output.squeeze(1), weights.squeeze(0)
    return attn_output, weights
