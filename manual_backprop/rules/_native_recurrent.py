"""The native loops over time of the recurrent rules: `csrc/recurrent.cpp`, built and loaded as `_native`'s MLP.

The Python rules in `rules/recurrent.py` stay the definition; where `loops_now()` allows, their forward
and backward call `torch.ops.manual_backprop_recurrent.{lstm,gru}_{forward,backward}` for the loop over
time (one pass over a step's rows for the gate arithmetic, the products by ATen) instead of running it
op by op in Python. Built on first use into its own folder beside the MLP's (keyed by the source, torch
and the Python ABI); `MANUAL_BACKPROP_NATIVE=0` and `_native.python_rule()` switch it off too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig
import threading
import warnings
from pathlib import Path

import torch

from manual_backprop.rules import _native

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "recurrent.cpp"
NAME = "manual_backprop_recurrent"

_lock = threading.Lock()
_ops = None
_tried = False


def build_directory() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes())
    for header in _native.HEADERS:  # direct.h: the BLAS lookup and products it shares with the MLP
        key.update(header.read_bytes())
    key.update(f"{torch.__version__}|{torch.version.cuda}|{sysconfig.get_config_var('SOABI')}|{_native.FLAGS}".encode())
    return _native.build_directory().parent / f"recurrent-{key.hexdigest()[:16]}"


def load():
    """torch.ops.manual_backprop_recurrent, building it first if needed; None where it cannot be built."""
    global _ops, _tried
    if _tried:
        return _ops
    with _lock:
        if not _tried:
            try:
                _ops = _load()
            except Exception as error:  # a failed build or load: the Python loops, with one warning
                warnings.warn(f"manual_backprop: the native recurrent loops are unavailable ({type(error).__name__}: "
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
        print(f"manual_backprop: building the native recurrent loops once (about 20-60 s) in {folder}",
              file=sys.stderr, flush=True)
        cpp_extension.load(NAME, [str(SOURCE)], build_directory=str(folder), is_python_module=False,
                           extra_cflags=_native.FLAGS, verbose=False)
        done.touch()
    else:
        torch.ops.load_library(str(library))
    return torch.ops.manual_backprop_recurrent


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
    return _ops if _tried else load()
