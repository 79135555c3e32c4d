"""The native twin of the fused MLP rule: built once, loaded, and when it may run.

`manual_backprop/csrc/mlp.cpp` is the loop of `rules/mlp.py` (the readable reference) written
as a C++ `torch::autograd::Function` from ATen ops, registered as the operator
`torch.ops.manual_backprop.mlp`. It is compiled with `torch.utils.cpp_extension` on first use
(about 20 s; a message says so) into a folder keyed by a hash of the source, the torch
version and the Python ABI, so every later process loads the built library at once:

    $MANUAL_BACKPROP_BUILD_DIR, else $XDG_CACHE_HOME/manual_backprop, else ~/.cache/manual_backprop

Why on first use and not at install: the project installs with plain setuptools in an isolated
build (`pip install -e .`), where torch is not importable without downloading it a second
time; building against the torch that actually runs avoids ABI mismatches; and a machine
without a compiler installs and works the same (the Python rule runs).

On CPU, for float32 and float64, the native rule takes a "direct" path: products straight to the
BLAS torch links, the elementwise steps as plain loops (no per-op dispatch); `direct_path(False)`
switches it off for a block, `direct_counts()` says how often it ran.

The per-layer rules have native twins too (`csrc/layers.cpp`: Linear, the elementwise activations, MSE,
BCE-with-logits and cross-entropy), one C++ node each, on the same direct path. They run by default where
`layers_now` allows; `MANUAL_BACKPROP_NATIVE_LAYERS=0` switches them off (the Python rules run), and a rule
whose Python backward has been replaced (a test breaking it, a user trying another rule) runs in Python.

`MANUAL_BACKPROP_NATIVE=0` (read when manual_backprop is imported) forces the Python rule;
`python_rule()` does so for a block. Without a C++ compiler or ninja, or if the
build fails, one warning says why and the Python rule runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import sysconfig
import threading
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from manual_backprop import observe
from manual_backprop._amp import autocast_on as _autocast_on
from manual_backprop.rules import activations as act

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE = _CSRC / "mlp.cpp"
# one library: the fused MLP, the per-layer rules (Linear, activations, losses) and the direct path they share
SOURCES = [SOURCE, _CSRC / "layers.cpp"]
HEADERS = [_CSRC / "direct.h"]
NAME = "manual_backprop_native"
FLAGS = ["-O3"]  # -O3 vectorises the direct path's loops (σ'⊙δ, Σₙ δ) for the baseline instruction set

# Elementwise rule -> (code in mlp.cpp's `Kind`, its parameters as two floats).
_ACTIVATION_CODES = {
    act.Identity: (0, lambda: (0.0, 0.0)),
    act.Sigmoid: (1, lambda: (0.0, 0.0)),
    act.Tanh: (2, lambda: (0.0, 0.0)),
    act.ReLU: (3, lambda: (0.0, 0.0)),
    act.LeakyReLU: (4, lambda slope: (float(slope), 0.0)),
    act.ELU: (5, lambda alpha: (float(alpha), 0.0)),
    act.Softplus: (6, lambda beta, threshold: (float(beta), float(threshold))),
    act.SiLU: (7, lambda: (0.0, 0.0)),
    act.GELU: (8, lambda approximate: ({"none": 0.0, "tanh": 1.0}[approximate], 0.0)),
    act.ReLU6: (9, lambda: (0.0, 0.0)),
    act.Hardtanh: (10, lambda min_val, max_val: (float(min_val), float(max_val))),
    act.Hardsigmoid: (11, lambda: (0.0, 0.0)),
    act.Hardswish: (12, lambda: (0.0, 0.0)),
    act.Mish: (13, lambda: (0.0, 0.0)),
}
# an MLP layer's activation names its rule by σ (`rules.mlp.activation`)
_BY_SIGMA = {rule.sigma: entry for rule, entry in _ACTIVATION_CODES.items()}

_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)

_lock = threading.Lock()
_op = None  # the loaded operator, once loaded
_tried = False
_forced_off = 0  # > 0 inside `python_rule()`
# read once: the check runs on every MLP call, and os.environ's lookup is a few Python frames
_ENVIRONMENT_ALLOWS = os.environ.get("MANUAL_BACKPROP_NATIVE", "1") != "0"
_encoded: dict = {}  # layers -> (kinds, params), or None where an activation has no native form
# The per-layer native rules run by default; MANUAL_BACKPROP_NATIVE_LAYERS=0 (read at import) switches them off.
# Their nodes are C++: a backward patched onto the Python rule would not run in them, so `layers_now` checks
# that the rule's backward is still the one it shipped with (`_WRITTEN`, recorded at import).
_LAYERS_ALLOWED = os.environ.get("MANUAL_BACKPROP_NATIVE_LAYERS", "1") != "0"
_layers_on = 0  # > 0 inside `native_layers()`


def build_directory() -> Path:
    """Where the library is built: one folder per (source, torch, Python ABI)."""
    key = hashlib.sha256()
    for path in SOURCES + HEADERS:
        key.update(path.read_bytes())
    key.update(f"{torch.__version__}|{torch.version.cuda}|{sysconfig.get_config_var('SOABI')}|{FLAGS}".encode())
    base = os.environ.get("MANUAL_BACKPROP_BUILD_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "manual_backprop"
    return Path(base) / f"native-{key.hexdigest()[:16]}"


def _fallback(reason: str) -> None:
    warnings.warn(f"manual_backprop: the native MLP rule is unavailable ({reason}); the Python rule runs instead "
                  "(same results, slower at small widths). Set MANUAL_BACKPROP_NATIVE=0 to silence this.",
                  RuntimeWarning, stacklevel=4)


def load():
    """The operator `torch.ops.manual_backprop.mlp`, building it first if needed; None where it cannot be built."""
    global _op, _tried
    if _tried:
        return _op
    with _lock:
        if _tried:
            return _op
        try:
            _op = _load()
        except Exception as error:  # a failed build or load: the Python rule, with one warning
            _fallback(f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}")
        _tried = True
    return _op


def _load():
    folder = build_directory()
    library, done = folder / f"{NAME}.so", folder / "built"
    if not done.exists():  # `done` is written after a whole build: never load a half-written library
        from torch.utils import cpp_extension

        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            _fallback(f"no C++ compiler: {compiler!r} is not on PATH")
            return None
        if not cpp_extension.is_ninja_available():
            _fallback("ninja, which torch.utils.cpp_extension needs, is not on PATH")
            return None
        folder.mkdir(parents=True, exist_ok=True)
        print(f"manual_backprop: building the native rules (fused MLP, per-layer) once (about 20-90 s) in {folder}",
              file=sys.stderr, flush=True)
        # takes a file lock in `folder`: concurrent processes (pytest -n 2) build once
        cpp_extension.load(NAME, [str(path) for path in SOURCES], build_directory=str(folder), is_python_module=False,
                           extra_cflags=FLAGS, verbose=False)
        done.touch()
    else:
        torch.ops.load_library(str(library))
    torch.ops.manual_backprop.name_nodes()  # each per-layer node's Python type named as its Python rule's node
    global _layers
    _layers = _LayerOps(*(_cpp(name) for name in _LayerOps._fields))
    return _cpp("mlp")


def _cpp(name: str):
    """The C++ operator itself, without OpOverload's Python frame."""
    overload = getattr(torch.ops.manual_backprop, name).default
    return getattr(overload, "_op", overload)


def encode(layers: tuple):
    """(kinds, params) for `layers` (`rules.mlp.activation` tuples or None), or None if any has no native form."""
    try:
        return _encoded[layers]
    except KeyError:
        pass
    except TypeError:  # unhashable parameters: work it out each call
        return _encode(layers)
    _encoded[layers] = encoded = _encode(layers)
    return encoded


def _encode(layers):
    kinds, params = [], []
    for activation in layers:
        if activation is None:
            kind, values = 0, (0.0, 0.0)
        else:
            sigma, _, _, extra = activation
            if sigma not in _BY_SIGMA:
                return None
            kind, encode_params = _BY_SIGMA[sigma]
            try:
                values = encode_params(*extra)
            except (TypeError, ValueError, KeyError):  # settings the C++ side does not take
                return None
        kinds.append(kind)
        params.extend(values)
    return kinds, params


def operator_now():
    """The native operator when it may run now, else None: not switched off, no torch.func transform active
    and torch.compile not tracing (both need a Python autograd.Function), built and loaded."""
    if _forced_off or not _ENVIRONMENT_ALLOWS or _transforms_active() or torch.compiler.is_compiling():
        return None
    return _op if _tried else load()


@contextlib.contextmanager
def direct_path(allowed: bool):
    """Allow or forbid, inside this block, the native rule's direct CPU path (BLAS and plain loops; csrc/mlp.cpp).

    Where forbidden, the native rule runs on ATen ops throughout: the tests and the benchmark run both.
    """
    if load() is None:
        raise RuntimeError("manual_backprop: the native MLP rule is not built, so it has no direct path to switch")
    previous = torch.ops.manual_backprop.set_direct(allowed)
    try:
        yield
    finally:
        torch.ops.manual_backprop.set_direct(previous)


def direct_counts() -> tuple[int, int]:
    """How many forwards and backwards the direct CPU path has run in this process (the tests check it ran)."""
    return tuple(torch.ops.manual_backprop.direct_counts()) if load() is not None else (0, 0)


def has_blas() -> bool:
    """Whether the direct CPU path found the BLAS (sgemm_, dgemm_) that torch links."""
    return load() is not None and torch.ops.manual_backprop.has_blas()


class _LayerOps(NamedTuple):
    """The per-layer rules' operators (csrc/layers.cpp)."""

    linear: Callable
    elementwise: Callable
    mse_loss: Callable
    bce_with_logits: Callable
    cross_entropy: Callable


_layers: _LayerOps | None = None  # set when the library loads
_is_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)  # one frame fewer
_LAYER_DTYPES = (torch.float32, torch.float64)
REDUCTIONS = {"mean": 1, "sum": 2}  # at::Reduction; "none" takes the Python rule


def layers_now(a: torch.Tensor, rule: type) -> _LayerOps | None:
    """The per-layer native operators when they may run now on `a` in place of `rule`, else None (the Python rule runs).

    Switched on (by default; not MANUAL_BACKPROP_NATIVE_LAYERS=0, or inside `native_layers()`), `rule.backward`
    as shipped (a replaced backward runs: the C++ node could not call it), and as `operator_now`: not
    switched off, no torch.func transform, torch.compile not tracing, built. Besides: `a` on the CPU in float32
    or float64 (the device and dtypes they are tested in), autocast off (the Python rules cast as autocast does), and nobody watching
    (`observe` reads δ and a from the Python rules). The one place that decides, called by the functional API
    before each per-layer rule. Double backward needs no Python rule: the nodes' backward is ATen ops then.
    """
    if (not (_LAYERS_ALLOWED or _layers_on) or _forced_off or not _ENVIRONMENT_ALLOWS or not a.is_cpu
            or a.dtype not in _LAYER_DTYPES or _autocast_on() or _transforms_active() or _is_compiling()
            or observe.current() is not None or rule.backward is not _WRITTEN.get(rule)):
        return None
    return _layers if _tried else (load() and _layers)


def activation_code(rule: type, params: tuple) -> tuple | None:
    """(code, p0, p1) of an Elementwise rule with its parameters for `elementwise`, or None (no native node)."""
    try:
        return _activation_codes[rule, params]
    except KeyError:
        pass
    except TypeError:  # unhashable parameters
        return None
    entry = _ACTIVATION_CODES.get(rule)
    code = None
    if entry is not None and rule is not act.Identity:  # identity returns its input: no node
        try:
            code = (entry[0], *entry[1](*params))
        except (TypeError, ValueError, KeyError):  # settings the C++ side does not take
            code = None
    _activation_codes[rule, params] = code
    return code


_activation_codes: dict = {}


def layer_counts() -> dict[str, tuple[int, int, int]]:
    """Per node family ("linear", "activation", "loss"): how many forwards, backwards, and backwards on the
    direct CPU path the per-layer native nodes have run in this process (the tests check which rule ran)."""
    counts = torch.ops.manual_backprop.layer_counts() if load() is not None else [0] * 9
    return {family: tuple(counts[3 * i : 3 * i + 3]) for i, family in enumerate(("linear", "activation", "loss"))}


def is_per_layer_node(node) -> bool:
    """Whether a grad_fn is one of the per-layer native nodes (named as its Python rule's node, LinearBackward…)."""
    # C++ nodes whose Python type csrc/layers.cpp made in torch.autograd.function, where the Python rules' nodes
    # live; torch's own C++ nodes are `builtins` types, the fused MLP's an unnamed "CppFunction"
    return (type(node).__module__ == "torch.autograd.function"
            and not isinstance(node, torch.autograd.function.BackwardCFunction))


@contextlib.contextmanager
def native_layers():
    """Run Linear, the elementwise activations and the MSE, BCE-with-logits and cross-entropy losses on their
    native nodes (csrc/layers.cpp) inside this block, where `layers_now` allows, even where
    MANUAL_BACKPROP_NATIVE_LAYERS=0 switched them off for the process. `python_rule()` and
    MANUAL_BACKPROP_NATIVE=0 still win. Their grad_fn has no `saved_tensors` (the Python rules' do)."""
    global _layers_on
    _layers_on += 1
    try:
        yield
    finally:
        _layers_on -= 1


@contextlib.contextmanager
def python_rule():
    """Run the Python rule inside this block, whatever the environment says (the benchmark's `fused`)."""
    global _forced_off
    _forced_off += 1
    try:
        yield
    finally:
        _forced_off -= 1


def _written_backwards() -> dict:
    """Each rule with a native twin -> its backward as shipped (the function `rule.backward` gives: a patch that
    puts the same function back, as a staticmethod or not, counts as shipped)."""
    from manual_backprop.rules import linear, losses  # imported here: both are loaded before this module's first use

    twins = (linear.Linear, losses.MSELoss, losses.BinaryCrossEntropyWithLogits, losses.CrossEntropy, *_ACTIVATION_CODES)
    return {rule: rule.backward for rule in twins}


_WRITTEN = _written_backwards()


class Library:
    """Another C++ source beside the MLP's (the recurrent and normalisation loops), built on first use into a
    folder of its own beside the MLP's, keyed like it (the source, the headers it includes, the flags, torch and
    the Python ABI), and loaded. `now()` is its `torch.ops` namespace, or None where it cannot be built: then one
    warning says why, and the Python rules run."""

    def __init__(self, source: Path, name: str, kind: str, what: str, flags: list, headers: tuple = ()) -> None:
        self.source, self.name, self.kind, self.what, self.flags, self.headers = source, name, kind, what, flags, headers
        self._lock, self._ops, self._tried = threading.Lock(), None, False

    def build_directory(self) -> Path:
        key = hashlib.sha256(self.source.read_bytes())
        for header in self.headers:
            key.update(header.read_bytes())
        key.update(f"{torch.__version__}|{torch.version.cuda}|{sysconfig.get_config_var('SOABI')}|{self.flags}".encode())
        return build_directory().parent / f"{self.kind}-{key.hexdigest()[:16]}"

    def now(self):
        """The ops, loading them on the first call (one attribute read on every later call)."""
        return self._ops if self._tried else self.load()

    def load(self):
        """torch.ops.<name>, building it first if needed; None where it cannot be built."""
        if self._tried:
            return self._ops
        with self._lock:
            if not self._tried:
                try:
                    self._ops = self._load()
                except Exception as error:  # a failed build or load: the Python rules, with one warning
                    warnings.warn(f"manual_backprop: the native {self.what} are unavailable ({type(error).__name__}: "
                                  f"{str(error).strip()[-200:]}); the Python rule runs instead. Set "
                                  "MANUAL_BACKPROP_NATIVE=0 to silence this.", RuntimeWarning, stacklevel=3)
                self._tried = True
        return self._ops

    def _load(self):
        folder = self.build_directory()
        if not (folder / "built").exists():  # `built` is written after a whole build
            from torch.utils import cpp_extension

            if shutil.which(os.environ.get("CXX", "c++")) is None or not cpp_extension.is_ninja_available():
                raise RuntimeError("no C++ compiler or no ninja on PATH")
            folder.mkdir(parents=True, exist_ok=True)
            print(f"manual_backprop: building the native {self.what} once (about 20-60 s) in {folder}",
                  file=sys.stderr, flush=True)
            cpp_extension.load(self.name, [str(self.source)], build_directory=str(folder), is_python_module=False,
                               extra_cflags=self.flags, verbose=False)
            (folder / "built").touch()
        else:
            torch.ops.load_library(str(folder / f"{self.name}.so"))
        return getattr(torch.ops, self.name)
