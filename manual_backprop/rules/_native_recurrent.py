"""The native loops over time of the recurrent rules: `csrc/recurrent.cpp`, built and loaded as `_native`'s MLP.

The Python rules in `rules/recurrent.py` stay the definition; where `loops_now()` allows, their forward
and backward call `torch.ops.manual_backprop_recurrent.{lstm,gru}_{forward,backward}` for the loop over
time (one pass over a step's rows for the gate arithmetic, the products by ATen) instead of running it
op by op in Python. Built on first use into its own folder beside the MLP's (keyed by the source, torch
and the Python ABI); `MANUAL_BACKPROP_NATIVE=0` and `_native.python_rule()` switch it off too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from manual_backprop.rules import _native

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "recurrent.cpp"
NAME = "manual_backprop_recurrent"

# -fno-trapping-math (as torch itself builds): lets the step loops' σ and tanh, with their selects, vectorise
FLAGS = [*_native.FLAGS, "-fno-trapping-math"]
LIBRARY = _native.Library(SOURCE, NAME, "recurrent", "recurrent loops", FLAGS, tuple(_native.HEADERS))
load = LIBRARY.load  # the ops, built first if needed; None where they cannot be


def loops_now(*tensors: torch.Tensor | None):
    """The native ops where they may run on `tensors` now, else None: CPU float32/float64, no torch.func
    transform, not traced by torch.compile, not switched off, and built."""
    if _native._forced_off or not _native._ENVIRONMENT_ALLOWS or _native._transforms_active():
        return None
    if torch.compiler.is_compiling():
        return None
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64)):
            return None
    return LIBRARY.now()
