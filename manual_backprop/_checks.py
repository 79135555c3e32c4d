"""Input checks shared by every rule: one place that says what bad input looks like.

Shape and dtype checks read only metadata, so they cost nothing on any device.
Value checks (BCE probabilities in [0, 1], class indices in [0, C)) must look at
data. Where looking is free (CPU tensors) or asked for (the debug switch) they do
so eagerly and name the first offending value. On CUDA they default to
`torch._assert_async`, a device-side assert that never blocks the host, so the
training hot path gains no host sync; turn on `debug_checks()` to get the
offending value named instead. Under torch.func.vmap, data-dependent checks are
not expressible and are skipped (documented in the README).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
from torch._C._functorch import is_functorch_wrapped_tensor


class InputError(ValueError, RuntimeError):
    """Bad input to a manual rule. Subclasses both ValueError and RuntimeError,
    so code written against torch's own errors keeps catching it."""


class TargetIndexError(InputError, IndexError):
    """A class index outside [0, C) that is not ignore_index (torch raises IndexError)."""


_debug = os.environ.get("MANUAL_BACKPROP_DEBUG", "") not in ("", "0", "false", "False")


def set_debug_checks(enabled: bool) -> None:
    """Always check values eagerly (host sync on CUDA) and name offending values."""
    global _debug
    _debug = bool(enabled)


def debug_checks_enabled() -> bool:
    return _debug


@contextlib.contextmanager
def debug_checks(enabled: bool = True) -> Iterator[None]:
    """Context manager form of `set_debug_checks`; also `MANUAL_BACKPROP_DEBUG=1`."""
    previous = _debug
    set_debug_checks(enabled)
    try:
        yield
    finally:
        set_debug_checks(previous)


def shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def same_dtype(op: str, **tensors: torch.Tensor | None) -> None:
    """All floating inputs of `op` share one dtype (after autocast's casts)."""
    present = {name: t for name, t in tensors.items() if t is not None}
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) > 1:
        described = ", ".join(f"{name}={t.dtype}" for name, t in present.items())
        raise InputError(f"{op}: inputs must share one dtype, got {described}")


def promote(*tensors: torch.Tensor | None, to: torch.dtype | None = None) -> tuple:
    """Cast to one dtype where torch's own kernel promotes (by type promotion, or to `to`)."""
    if to is None:
        present = [t for t in tensors if t is not None]
        to = present[0].dtype
        for t in present[1:]:
            to = torch.promote_types(to, t.dtype)
    return tuple(t if t is None or t.dtype == to else t.to(to) for t in tensors)


def floating(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise InputError(f"{op}: {name} must be a floating point tensor, got dtype {t.dtype}")


def check_values(
    op: str,
    values: torch.Tensor,
    ok: Callable[[torch.Tensor], torch.Tensor],
    requirement: str,
    error: type[InputError] = InputError,
    within: tuple[float, float] | None = None,
) -> None:
    """Raise `error` unless `ok(values)` (a bool mask shaped like values) is all true.

    The eager path names the first offending value and its index; the device path
    (CUDA without debug checks) says only the requirement, since naming the value
    would need the host to wait for the device. `within=(low, high)`, a range that
    implies `ok`, lets the eager path accept the common case with one min/max pass.
    """
    if values.numel() == 0:
        return
    compiling = torch.compiler.is_compiling()
    if not compiling and is_functorch_wrapped_tensor(values):
        return  # under torch.func transforms data-dependent checks cannot run
    if compiling or (values.device.type != "cpu" and not _debug):
        torch._assert_async(ok(values).all(), f"{op}: {requirement}")
        return
    if within is not None:
        low, high = torch.aminmax(values)
        if low >= within[0] and high <= within[1]:  # NaN fails both: falls through to the mask
            return
    mask = ok(values)
    if not bool(mask.all()):
        index = tuple(int(i) for i in (~mask).nonzero()[0])
        raise error(f"{op}: {requirement}; got {values[index].item()!r} at index {index}")
