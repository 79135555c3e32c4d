"""`torch.nn.functional`, with every gradient from our rules.

Same names, signatures and defaults as torch.nn.functional. Each function checks
its inputs (metadata only on the hot path; see `_checks`), casts them as autocast
would cast the stock op's (see `_amp`), and calls its rule in `manual_backprop.rules`.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.nn import _reduction

from manual_backprop import _checks, rules
from manual_backprop._amp import autocast_inputs
from manual_backprop._checks import InputError, TargetIndexError, shape
from manual_backprop.rules._apply import apply_rule

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "elu",
    "gelu",
    "leaky_relu",
    "linear",
    "mse_loss",
    "relu",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "tanh",
    # embedding and attention
    "embedding",
    "multi_head_attention_forward",
    "scaled_dot_product_attention",
]


# ---------------------------------------------------------------- linear


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """z = a Wᵀ + b.  Input: (*, in_features); weight: (out, in); bias: (out,). Output: (*, out)."""
    if weight.dim() != 2:
        raise InputError(f"linear: weight must be 2-D (out_features, in_features), got shape {shape(weight)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise InputError(
            f"linear: input's last dimension must equal in_features={weight.shape[1]}, "
            f"got input of shape {shape(input)} for weight of shape {shape(weight)}"
        )
    if bias is not None and shape(bias) != (weight.shape[0],):
        raise InputError(
            f"linear: bias must have shape ({weight.shape[0]},) to match weight {shape(weight)}, got {shape(bias)}"
        )
    input, weight, bias = autocast_inputs("linear", input.device, input, weight, bias)
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        _checks.same_dtype("linear", input=input, weight=weight, bias=bias)
    return apply_rule(rules.Linear, input, weight, bias)


# ----------------------------------------------------------- activations


def _activate(op: str, rule, input: torch.Tensor, inplace: bool, *params) -> torch.Tensor:
    (input,) = autocast_inputs(op, input.device, input)
    if inplace:
        z_before = input.clone() if rule.sigma_prime_from == "z" else None
        return apply_rule(rules.activations.InplaceElementwise, rule, input, z_before, *params)
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


# ---------------------------------------------------------------- losses


def _reduction_of(op: str, size_average, reduce, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction not in ("none", "mean", "sum"):
        raise InputError(f"{op}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return reduction


def _constant(op: str, **tensors: torch.Tensor | None) -> None:
    """Weights are constants in our rules (torch's own kernels do not differentiate them either)."""
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise InputError(f"{op}: {name} requires grad, but the rule treats it as a constant")


def _broadcastable(op: str, what: str, a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise InputError(
            f"{op}: {what}: {a_name} of shape {shape(a)} and {b_name} of shape {shape(b)} do not broadcast"
        ) from None


def mse_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    reduction = _reduction_of("mse_loss", size_average, reduce, reduction)
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=2,
        )
        _broadcastable("mse_loss", "sizes differ", input, target, "input", "target")
    if weight is not None and weight.size() != input.size():
        raise InputError(f"mse_loss: weight must have the input's shape {shape(input)}, got {shape(weight)}")
    _constant("mse_loss", weight=weight)
    input, target, weight = autocast_inputs("mse_loss", input.device, input, target, weight)
    _checks.floating("mse_loss", "input", input)
    input, target, weight = _checks.promote(input, target, weight)  # torch promotes here
    return apply_rule(rules.MSELoss, input, target, weight, reduction)


def binary_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    reduction = _reduction_of("binary_cross_entropy", size_average, reduce, reduction)
    if target.size() != input.size():
        raise InputError(
            f"binary_cross_entropy: target shape {shape(target)} must equal input shape {shape(input)}"
        )
    if weight is not None:
        _broadcastable("binary_cross_entropy", "weight", weight, input, "weight", "input")
        weight = weight.expand(torch.broadcast_shapes(weight.shape, input.shape))
    _constant("binary_cross_entropy", weight=weight)
    input, target, weight = autocast_inputs("binary_cross_entropy", input.device, input, target, weight)
    _checks.floating("binary_cross_entropy", "input", input)
    _checks.same_dtype("binary_cross_entropy", input=input, target=target)  # torch refuses to mix these
    (weight,) = _checks.promote(weight, to=input.dtype)  # and casts the weight
    _checks.check_values(
        "binary_cross_entropy",
        input.detach(),
        lambda p: (p >= 0) & (p <= 1),
        "input probabilities must lie in [0, 1]",
        within=(0, 1),
    )
    return apply_rule(rules.BinaryCrossEntropy, input, target, weight, reduction)


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    op = "binary_cross_entropy_with_logits"
    reduction = _reduction_of(op, size_average, reduce, reduction)
    if target.size() != input.size():
        raise InputError(f"{op}: target shape {shape(target)} must equal input shape {shape(input)}")
    for name, w in (("weight", weight), ("pos_weight", pos_weight)):
        if w is not None:
            _broadcastable(op, name, w, input, name, "input")
    _constant(op, weight=weight, pos_weight=pos_weight)
    input, target, weight, pos_weight = autocast_inputs(op, input.device, input, target, weight, pos_weight)
    _checks.floating(op, "input", input)
    input, target = _checks.promote(input, target)  # torch promotes input and target
    weight, pos_weight = _checks.promote(weight, pos_weight, to=input.dtype)
    return apply_rule(rules.BinaryCrossEntropyWithLogits, input, target, weight, pos_weight, reduction)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Input: (C), (N, C) or (N, C, d1, ...) logits. Target: class indices of shape (), (N) or
    (N, d1, ...), or class probabilities shaped like input."""
    op = "cross_entropy"
    reduction = _reduction_of(op, size_average, reduce, reduction)
    if input.dim() == 0:
        raise InputError(f"{op}: input must have a class dimension, got a 0-d tensor")
    if not 0.0 <= label_smoothing <= 1.0:
        raise InputError(f"{op}: label_smoothing must lie in [0, 1], got {label_smoothing}")
    dim = rules.losses.class_dim(input)
    num_classes = input.shape[dim]
    if weight is not None and shape(weight) != (num_classes,):
        raise InputError(f"{op}: weight must have shape ({num_classes},) for {num_classes} classes, got {shape(weight)}")
    _constant(op, weight=weight)
    if target.is_floating_point():
        if ignore_index != -100:  # torch refuses it for probability targets too
            raise InputError(f"{op}: ignore_index is not supported for floating point target (got ignore_index={ignore_index})")
        if target.shape != input.shape:
            raise InputError(
                f"{op}: probability targets must have the input's shape {shape(input)}, got {shape(target)}"
            )
    else:
        if target.dtype not in (torch.int64, torch.uint8):
            raise InputError(f"{op}: class-index targets must be int64 (or uint8), got dtype {target.dtype}")
        expected = shape(input)[:dim] + shape(input)[dim + 1 :]
        if shape(target) != expected:
            raise InputError(
                f"{op}: class-index target must have shape {expected} for input of shape {shape(input)}, "
                f"got {shape(target)}"
            )
        _checks.check_values(
            op,
            target,
            lambda t: ((t >= 0) & (t < num_classes)) | (t == ignore_index),
            f"class indices must lie in [0, {num_classes}) or equal ignore_index={ignore_index}",
            error=TargetIndexError,
            within=(0, num_classes - 1),
        )
    if target.is_floating_point():
        input, target, weight = autocast_inputs(op, input.device, input, target, weight)
        input, target, weight = _checks.promote(input, target, weight)  # torch promotes here
    else:
        input, weight = autocast_inputs(op, input.device, input, weight)
        _checks.same_dtype(op, input=input, weight=weight)  # torch refuses to mix these
    _checks.floating(op, "input", input)
    loss, _ = apply_rule(rules.CrossEntropy, input, target, weight, ignore_index, reduction, label_smoothing)
    return loss


# -------------------------------------------------------------- embedding


def embedding(
    input: torch.Tensor,
    weight: torch.Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    """z = E[x].  Input: (*) integer indices; weight: (num_embeddings, embedding_dim). Output: (*, embedding_dim).

    max_norm renormalises the rows looked up, in place and without gradient, as torch does.
    """
    op = "embedding"
    if weight.dim() != 2:
        raise InputError(f"{op}: weight must be 2-D (num_embeddings, embedding_dim), got shape {shape(weight)}")
    if input.dtype not in (torch.int64, torch.int32):
        raise InputError(f"{op}: indices must be int64 or int32, got dtype {input.dtype}")
    if sparse:
        raise InputError(
            f"{op}: sparse=True (sparse weight gradients) is not supported by the manual rule; "
            "use sparse=False, or keep this embedding on stock autograd"
        )
    num_embeddings = weight.shape[0]
    if padding_idx is not None:
        if not -num_embeddings <= padding_idx < num_embeddings:
            raise InputError(f"{op}: padding_idx={padding_idx} must be within num_embeddings={num_embeddings}")
        padding_idx = padding_idx % num_embeddings
    _checks.check_values(
        op,
        input,
        lambda x: (x >= 0) & (x < num_embeddings),
        f"indices must lie in [0, {num_embeddings})",
        error=TargetIndexError,
        within=(0, num_embeddings - 1),
    )
    if max_norm is not None:
        input = input.contiguous()
        with torch.no_grad():
            torch.embedding_renorm_(weight, input, max_norm, norm_type)
    return apply_rule(rules.Embedding, input, weight, padding_idx, scale_grad_by_freq)


# -------------------------------------------------------------- attention


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
        P = P * keep * rules.attention._keep_scale(dropout_p)
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
    attn_output = attn_output.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim)
    attn_output = linear(attn_output, out_proj_weight, out_proj_bias).view(tgt_len, bsz, -1)
    if not need_weights:
        return (attn_output if is_batched else attn_output.squeeze(1)), None
    if average_attn_weights:
        weights = weights.mean(dim=1)
    if not is_batched:
        attn_output, weights = attn_output.squeeze(1), weights.squeeze(0)
    return attn_output, weights
