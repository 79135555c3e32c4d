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

import hashlib
import os
import shutil
import sys
import sysconfig
import threading
import warnings
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

_lock = threading.Lock()
_ops = None
_tried = False
calls: Counter = Counter()  # op name -> how often it ran in this process


def build_directory() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(f"{torch.__version__}|{torch.version.cuda}|{sysconfig.get_config_var('SOABI')}|{FLAGS}".encode())
    return _native.build_directory().parent / f"norm-{key.hexdigest()[:16]}"


def load():
    """torch.ops.manual_backprop_norm, building it first if needed; None where it cannot be built."""
    global _ops, _tried
    if _tried:
        return _ops
    with _lock:
        if not _tried:
            try:
                _ops = _load()
            except Exception as error:  # a failed build or load: the Python rule, with one warning
                warnings.warn(f"manual_backprop: the native normalisation loops are unavailable ({type(error).__name__}: "
                              f"{str(error).strip()[-200:]}); the Python rule runs instead. Set "
                              "MANUAL_BACKPROP_NATIVE=0 to silence this.", RuntimeWarning, stacklevel=3)
            _tried = True
    return _ops


def _load():
    folder = build_directory()
    library, done = folder / f"{NAME}.so", folder / "built"
    if not done.exists():
        from torch.utils import cpp_extension

        if shutil.which(os.environ.get("CXX", "c++")) is None or not cpp_extension.is_ninja_available():
            raise RuntimeError("no C++ compiler or no ninja on PATH")
        folder.mkdir(parents=True, exist_ok=True)
        print(f"manual_backprop: building the native normalisation loops once (about 20-60 s) in {folder}",
              file=sys.stderr, flush=True)
        cpp_extension.load(NAME, [str(SOURCE)], build_directory=str(folder), is_python_module=False,
                           extra_cflags=FLAGS, verbose=False)
        done.touch()
    else:
        torch.ops.load_library(str(library))
    return torch.ops.manual_backprop_norm


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
    return _ops if _tried else load()
