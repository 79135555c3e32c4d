"""The embedding lookup, z = E[x], on `rules.Embedding`: torch's padding_idx, max_norm renormalisation and
scale_grad_by_freq, with index checks."""

from __future__ import annotations

import torch

from manual_backprop import _checks, rules
from manual_backprop._checks import InputError, TargetIndexError, shape
from manual_backprop.rules._apply import apply_rule


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
