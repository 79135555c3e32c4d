"""Argument checks more than one family of `manual_backprop.functional` shares: tensors a rule treats as
constants, and the int-or-tuple arguments and (un)batched spatial inputs of convolution and pooling."""

from __future__ import annotations

import torch

from manual_backprop._checks import InputError


def _constant(op: str, **tensors: torch.Tensor | None) -> None:
    """Weights are constants in our rules (torch's own kernels do not differentiate them either)."""
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise InputError(f"{op}: {name} requires grad, but the rule treats it as a constant")


def _ntuple(op: str, name: str, value, d: int) -> tuple[int, ...]:
    """An int or a sequence of 1 or d ints → d ints (torch expands a single value the same way)."""
    if isinstance(value, int):
        return (value,) * d
    value = tuple(value)
    if len(value) == 1:
        return value * d
    if len(value) != d or not all(isinstance(v, int) for v in value):
        raise InputError(f"{op}: {name} must be an int or a tuple of {d} ints, got {value}")
    return value


def _spatial_input(op: str, input: torch.Tensor, d: int) -> None:
    if input.dim() not in (d + 1, d + 2):
        raise InputError(
            f"{op}: Expected {d + 1}D (unbatched) or {d + 2}D (batched) input to {op}, "
            f"but got input of size: {list(input.shape)}"
        )
