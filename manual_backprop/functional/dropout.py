"""Dropout on the rules of `rules.dropout`: elementwise, and the channel-wise dropout1d/2d/3d, with the mask
drawn as torch's CPU kernel draws it, so the same seed drops the same units."""

from __future__ import annotations

import warnings

import torch

from manual_backprop import rules
from manual_backprop._checks import InputError, shape
from manual_backprop.rules._apply import apply_rule


def _dropout(input: torch.Tensor, p: float, training: bool, inplace: bool, mask_shape) -> torch.Tensor:
    """Draw the mask as torch's CPU kernel does (bernoulli_(1 − p) on the mask's shape), then the rule.

    Eval, p = 0 and empty inputs return the input itself, no graph node (as torch)."""
    if p < 0.0 or p > 1.0:
        raise InputError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0 or input.numel() == 0:
        return input
    if p == 1:  # torch draws nothing here: the input times zero
        mask = torch.zeros(mask_shape, dtype=torch.bool, device=input.device)
    elif tuple(mask_shape) == tuple(input.shape):  # empty_like keeps the input's strides, as torch's kernel does,
        mask = torch.empty_like(input, dtype=torch.bool).bernoulli_(1 - p)  # so a non-contiguous input gets its mask
    else:
        mask = torch.empty(mask_shape, dtype=torch.bool, device=input.device).bernoulli_(1 - p)
    if inplace:
        return apply_rule(rules.dropout.InplaceDropout, input, mask, p)
    return apply_rule(rules.Dropout, input, mask, p)


def _feature_mask_shape(input: torch.Tensor, batched: bool = True) -> tuple[int, ...]:
    """One mask value per channel: (N, C, 1, …), or (C, 1, …) for an unbatched input."""
    if not batched:
        return (input.shape[0],) + (1,) * (input.dim() - 1)
    if input.dim() < 2:
        raise InputError(f"Feature dropout requires at least 2 dimensions in the input, got {shape(input)}")
    return tuple(input.shape[:2]) + (1,) * (input.dim() - 2)


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """a = z ⊙ m / (1 − p), m ~ Bernoulli(1 − p) per element."""
    return _dropout(input, p, training, inplace, input.shape)


def dropout1d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Whole channels dropped. Input: (N, C, L) or (C, L)."""
    if p < 0.0 or p > 1.0:
        raise InputError(f"dropout probability has to be between 0 and 1, but got {p}")
    if input.dim() not in (2, 3):
        raise InputError(
            f"dropout1d: Expected 2D or 3D input, but received a {input.dim()}D input. "
            "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
            "spatial dimension, a channel dimension, and an optional batch dimension "
            "(i.e. 2D or 3D inputs)."
        )
    return _dropout(input, p, training, inplace, _feature_mask_shape(input, input.dim() == 3))


def dropout2d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Whole channels dropped. Input: (N, C, H, W) (a 3-D input is taken as (N, C, L), as torch)."""
    if p < 0.0 or p > 1.0:
        raise InputError(f"dropout probability has to be between 0 and 1, but got {p}")
    if input.dim() not in (3, 4):
        warnings.warn(
            f"dropout2d: Received a {input.dim()}-D input to dropout2d, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            "and silence this warning, please use dropout instead. Note that dropout2d "
            "exists to provide channel-wise dropout on inputs with 2 spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. 3D or 4D inputs).",
            stacklevel=2,
        )
    if input.dim() == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
            "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
            "is the channel dim. This behavior will change in a future release to interpret the "
            "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
            "channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=2,
        )
    return _dropout(input, p, training, inplace, _feature_mask_shape(input))


def dropout3d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Whole channels dropped. Input: (N, C, D, H, W) or (C, D, H, W)."""
    if p < 0.0 or p > 1.0:
        raise InputError(f"dropout probability has to be between 0 and 1, but got {p}")
    if input.dim() not in (4, 5):
        warnings.warn(
            f"dropout3d: Received a {input.dim()}-D input to dropout3d, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            "and silence this warning, please use dropout instead. Note that dropout3d "
            "exists to provide channel-wise dropout on inputs with 3 spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. 4D or 5D inputs).",
            stacklevel=2,
        )
    return _dropout(input, p, training, inplace, _feature_mask_shape(input, input.dim() == 5))
