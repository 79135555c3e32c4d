"""The native loops of the LayerNorm, GroupNorm and BatchNorm (training) rules: `csrc/norm.cpp`, built and
loaded as `_native`'s MLP.

The Python rules in `rules/norm.py` stay the definition; where `rows_now()` allows, their forward and
backward call `torch.ops.manual_backprop_norm.{forward,backward}` (LayerNorm, GroupNorm: x as rows, each
normalised alone) or `{batch_forward,batch_backward}` (BatchNorm: per channel), five passes over x where the
unfused ops take about ten. Built on first use into its own folder beside the MLP's (keyed by the source,
the flags, torch and the Python ABI); `MANUAL_BACKPROP_NATIVE=0` and `_native.python_rule()` switch it off
too. `calls` counts the native calls by name (the tests check they ran).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from manual_backprop.rules import _native

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "norm.cpp"
NAME = "manual_backprop_norm"
# The loops are plain C++ that the compiler vectorises (-fopenmp-simd: the sums' `omp simd` pragmas, no
# OpenMP runtime), for AVX2 where torch itself dispatches to AVX2 or above on this CPU (the folder's key
# holds the flags, so another CPU builds its own).
FLAGS = [*_native.FLAGS, "-fopenmp-simd",
         *(["-mavx2", "-mfma"] if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else [])]

LIBRARY = _native.Library(SOURCE, NAME, "norm", "normalisation loops", FLAGS, ())
load = LIBRARY.load  # the ops, built first if needed; None where they cannot be
calls: Counter = Counter()  # op name -> how often it ran in this process


def rows_now(x: torch.Tensor, *params: torch.Tensor | None):
    """The native ops where they may run on x (and γ, β) now, else None: contiguous CPU float32/float64
    tensors of one dtype, no torch.func transform, not traced by torch.compile, not switched off, and built."""
    if _native._forced_off or not _native._ENVIRONMENT_ALLOWS or _native._transforms_active():
        return None
    if torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    if x.numel() == 0 or not x.is_contiguous():
        return None
    if any(p is not None and (p.dtype != x.dtype or p.device != x.device or not p.is_contiguous()) for p in params):
        return None
    return LIBRARY.now()
