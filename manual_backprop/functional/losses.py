"""Losses, J and the output error δ(L) = ∂J/∂z(L), on the rules of `rules.losses`: mean squared error,
binary cross-entropy (on probabilities and on logits) and cross-entropy, with torch's reductions, weights,
legacy size_average/reduce arguments and target checks."""

from __future__ import annotations

import warnings

import torch
from torch.nn import _reduction

from manual_backprop import _checks, rules
from manual_backprop._amp import autocast_inputs
from manual_backprop._checks import InputError, TargetIndexError, shape
from manual_backprop.functional._common import _constant
from manual_backprop.rules import _native
from manual_backprop.rules._apply import apply_rule


def _reduction_of(op: str, size_average, reduce, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction not in ("none", "mean", "sum"):
        raise InputError(f"{op}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return reduction


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
    native = _native.layers_now(input, rules.MSELoss)  # the rule's C++ twin (csrc/layers.cpp): mean or sum, no weight, one shape
    if native is not None and weight is None and reduction != "none" and target.shape == input.shape:
        return native.mse_loss(input, target, _native.REDUCTIONS[reduction])
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
    native = _native.layers_now(input, rules.BinaryCrossEntropyWithLogits)  # the rule's C++ twin (csrc/layers.cpp): mean or sum, no weights
    if native is not None and weight is None and pos_weight is None and reduction != "none":
        return native.bce_with_logits(input, target, _native.REDUCTIONS[reduction])
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
    native = _native.layers_now(input, rules.CrossEntropy)  # the rule's C++ twin (csrc/layers.cpp): the notes' case, (N, C) logits,
    if (native is not None and input.dim() == 2 and target.dtype == torch.int64 and weight is None  # int64 classes
            and not label_smoothing and reduction != "none"):
        return native.cross_entropy(input, target, ignore_index, _native.REDUCTIONS[reduction])
    loss, _ = apply_rule(rules.CrossEntropy, input, target, weight, ignore_index, reduction, label_smoothing)
    return loss
