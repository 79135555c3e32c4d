"""The δ tape: δ(l) and a(l), layer by layer, as the rules' backward computed them.

The notes' backward is one recursion, δ(l) = (W(l)ᵀ δ(l+1)) ⊙ σ'(z(l)), and each weight
gradient is δ(l+1) a(l)ᵀ. Our rules hold both factors in their backward; the tape keeps
them (one `observe` observer, the same mechanism per-sample gradients use):

    with manual_backprop.tape(model, keep=("delta", "input"), reduce=None) as tape:
        loss_fn(model(x), y).backward()
    tape.delta["encoder.0"]     # δ = ∂J/∂(module output), shaped like that output
    tape.input["encoder.0"]     # a, the module's input as the rule saw it
    tape.names                  # the recorded names, in backward order (output layer first)

Keys are qualified module names in `model` ("" for `model` itself when it holds
parameters directly). A fused `MLP` reports each layer under "<mlp>.layers.<k>", δ of
layer k's pre-activation z(k+1) as if it were a Linear, so the MLP and the equivalent
converted `nn.Sequential` give the same δ's under their own names. A rule run on a
parameter other than its module's `weight` is named after that parameter: multi-head
attention records "<attn>.in_proj" (δ of the packed q, k, v projections) and "<attn>.out_proj".

- A module called more than once in one forward (a shared layer, a block applied twice):
  every call is recorded. The first call in forward order keeps the plain name, later
  ones get "#1", "#2", … ("shared", "shared#1"). Code written for single-use modules
  keeps working, and the suffix says which call it is.
- One backward is one `Step`. Each backward inside the context appends a step;
  `tape.delta` / `input` / `output` / `names` are those of the latest. `tape.steps`
  keeps every step when `reduce` is set (statistics are small: a training loop under
  one tape gives a series per layer, `tape.series(name)`), and only the latest when
  tensors are kept whole (reduce=None: memory would grow each step); `history=` overrides.
  A step ends when the backward pass that opened it ends (autograd's final callback).
- `reduce` keeps a statistic instead of the tensor: "norm" (L2 over everything, batch
  included), "mean_abs", "rms" (√mean(x²)), "per_sample_norm" (N values: L2 over all but
  the first dimension, which is the sample dimension as for per-sample gradients; a
  tensor with no batch dimension counts as one sample; attention's (L, N, E) tensors are
  reduced along N), or any callable tensor → tensor.
  On a batch of 0: norm 0, per_sample_norm shape (0,), mean_abs and rms NaN (a mean of
  nothing). Integer inputs (Embedding's indices) are reduced as floats.
- Recorded tensors are detached; nothing here changes any gradient.
- torch.compile: never silently nothing. `tape(torch.compile(model))` raises InputError (its
  compiled backward would not report δ). `model.compile()` or a compiled function calling the
  model records what eager records: a rule asked to report while Dynamo traces raises, and
  Dynamo runs that region eagerly (`observe.current` also guards on an open watch, so code
  compiled before the tape opened is traced again rather than run without hooks); with
  fullgraph=True that raise reaches the user.
- A model whose rules never report (stock modules, not converted) records nothing: the
  tape warns at exit when the model ran forward inside the context but nothing was recorded.

`manual_backprop.tape` is this module's `tape` function (it shadows the module as a
package attribute; `from manual_backprop.tape import Tape, Step` still works).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Optional, Union

import torch

from manual_backprop import observe
from manual_backprop._checks import InputError

KEEP = ("delta", "input", "output")


def _floating(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_floating_point() or t.is_complex() else t.to(torch.get_default_dtype())


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    t = _floating(t)
    if t.dim() < 2:  # no batch dimension: one sample
        return torch.linalg.vector_norm(t.reshape(1, -1), dim=1)
    return torch.linalg.vector_norm(t.reshape(t.shape[0], math.prod(t.shape[1:])), dim=1)


def _graph_task() -> int:
    """autograd's id of the backward pass now running (-1 outside one)."""
    return torch._C._current_graph_task_id()


def _name(seen: observe.Seen) -> str:
    """The module's name; for a rule run on a parameter other than the module's own `weight` (multi-head
    attention's in_proj_weight and out_proj.weight), the module's name and that parameter's stem:
    "attn.in_proj", "attn.out_proj". Fused layers keep "<mlp>.layers.<k>"."""
    if seen.layer or not seen.params:
        return seen.name
    relative = seen.call.parameter_name(seen.params[0])
    if relative is None or relative == "weight":
        return seen.name
    stem = relative[: -len("weight")].rstrip("._") if relative.endswith("weight") else relative
    return ".".join(part for part in (seen.call.name, stem or relative) if part)


REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "norm": lambda t: torch.linalg.vector_norm(_floating(t)),
    "mean_abs": lambda t: _floating(t).abs().mean(),
    "rms": lambda t: torch.linalg.vector_norm(_floating(t)) / math.sqrt(t.numel()) if t.numel() else _floating(t).sum() * math.nan,
    "per_sample_norm": _per_sample_norm,
}

Reduce = Union[None, str, Callable[[torch.Tensor], torch.Tensor]]


def _check_keep(keep) -> tuple[str, ...]:
    if isinstance(keep, str):
        keep = (keep,)
    try:
        keep = tuple(keep)
    except TypeError:
        raise InputError(f"tape: keep must be a name or a sequence of names from {KEEP}, got {keep!r}") from None
    for what in keep:
        if what not in KEEP:
            raise InputError(f"tape: unknown keep entry {what!r}; choose from {KEEP}")
    if not keep:
        raise InputError(f"tape: keep is empty; choose at least one of {KEEP}")
    return keep


def _check_reduce(reduce: Reduce) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    if reduce is None:
        return None
    if isinstance(reduce, str):
        if reduce not in REDUCTIONS:
            raise InputError(f"tape: unknown reduce {reduce!r}; choose from {sorted(REDUCTIONS)}, None or a callable")
        return REDUCTIONS[reduce]
    if callable(reduce):
        return reduce
    raise InputError(f"tape: reduce must be None, one of {sorted(REDUCTIONS)} or a callable, got {reduce!r}")


class Step:
    """What one backward recorded: `delta`, `input`, `output` (name → tensor or statistic) and
    `names` (backward order). Only the quantities the tape keeps are filled."""

    def __init__(self) -> None:
        self._entries: list[tuple[str, int, dict]] = []  # (seen name, call index, {what: value}), arrival order
        self._built: Optional[dict] = None

    def _add(self, name: str, call_index: int, values: dict) -> None:
        self._entries.append((name, call_index, values))
        self._built = None

    def _build(self) -> dict:
        """Keys: the first call of a name in forward order gets the name, later calls "#1", "#2", …"""
        if self._built is None:
            # Forward order: by call index; two reports inside one call arrive in backward order (reversed).
            ranks: dict[int, str] = {}
            by_name: dict[str, list[tuple[int, int]]] = {}
            for arrival, (name, call_index, _) in enumerate(self._entries):
                by_name.setdefault(name, []).append((call_index, -arrival))
            for name, order in by_name.items():
                for k, (_, negative_arrival) in enumerate(sorted(order)):
                    ranks[-negative_arrival] = name if k == 0 else f"{name}#{k}"
            built: dict = {"names": [], **{what: {} for what in KEEP}}
            for arrival, (_, _, values) in enumerate(self._entries):
                key = ranks[arrival]
                built["names"].append(key)
                for what, value in values.items():
                    built[what][key] = value
            self._built = built
        return self._built

    @property
    def names(self) -> list[str]:
        return list(self._build()["names"])

    @property
    def delta(self) -> dict:
        return self._build()["delta"]

    @property
    def input(self) -> dict:
        return self._build()["input"]

    @property
    def output(self) -> dict:
        return self._build()["output"]

    def __repr__(self) -> str:
        return f"Step({len(self._entries)} records: {', '.join(self.names)})"


class Tape:
    """Records δ (and a, the output) at each parametric rule's backward while the context is open.

    Made by `manual_backprop.tape(model, keep=..., reduce=..., history=...)`; see the module docstring.
    """

    def __init__(self, model: torch.nn.Module, keep: Iterable[str] = ("delta", "input"), reduce: Reduce = None,
                 history: Optional[bool] = None) -> None:
        self.keep = _check_keep(keep)
        self._reduce = _check_reduce(reduce)
        self.reduce = reduce
        self.history = (reduce is not None) if history is None else bool(history)
        self.keep_output = "output" in self.keep  # asks the rules to hand over their output (observe)
        self.model = model
        self.steps: list[Step] = []
        self._open: Optional[Step] = None  # the step of the backward now running
        self._forwards = 0
        self._watch = observe.watch(model, self)  # raises on a compiled model
        self._handle = None

    # ------------------------------------------------------------ recording

    def _value(self, t: Optional[torch.Tensor], batch_dim: int) -> Optional[torch.Tensor]:
        t = t.detach()
        if self._reduce is None:
            return t
        if self.reduce == "per_sample_norm" and batch_dim and t.dim() > batch_dim:
            t = t.movedim(batch_dim, 0)  # samples along another dimension (attention's (L, N, E))
        return self._reduce(t)

    def see(self, seen: observe.Seen) -> None:
        """observe's callback, inside a rule's backward."""
        step = self._open
        if step is None:  # the first report of this backward pass
            step = self._open = Step()
            if not self.history:
                self.steps.clear()
            self.steps.append(step)
            try:  # the step ends with the backward pass that opened it (a reentrant checkpoint's inner one runs inside)
                torch.autograd.Variable._execution_engine.queue_callback(lambda: self._close(step))
            except RuntimeError:  # not inside autograd's engine: the step ends at the next forward
                pass
        values = {}
        for what, tensor in (("delta", seen.delta), ("input", seen.input), ("output", seen.output)):
            if what in self.keep and tensor is not None:
                values[what] = self._value(tensor, getattr(seen, "batch_dim", 0) or 0)
        step._add(_name(seen), seen.call.index, values)

    def _close(self, step: Step) -> None:
        if self._open is step:
            self._open = None

    def _count_forward(self, module, args) -> None:
        if torch.compiler.is_compiling():  # traced: the rules' own check (observe.current) speaks
            return
        self._forwards += 1
        if _graph_task() == -1:  # a forward outside backward (not a checkpoint's recomputation inside one)
            self._open = None

    # ------------------------------------------------------------ context

    def __enter__(self) -> "Tape":
        self._watch.__enter__()
        self._handle = self.model.register_forward_pre_hook(self._count_forward)
        self._forwards = 0
        return self

    def __exit__(self, *exc) -> None:
        self._watch.__exit__(*exc)
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._open = None
        if exc[0] is None and self._forwards and not self.steps:
            warnings.warn(
                f"manual_backprop.tape recorded nothing: {type(self.model).__name__} ran forward inside the tape but "
                "no parametric rule of manual_backprop reported a backward (are its modules converted, and did "
                "backward run inside the `with` block?)",
                stacklevel=2,
            )

    # ------------------------------------------------------------ reading

    def _latest(self) -> Step:
        return self.steps[-1] if self.steps else Step()

    @property
    def delta(self) -> dict:
        """name → δ = ∂J/∂(output) of the latest backward (or its statistic)."""
        return self._latest().delta

    @property
    def input(self) -> dict:
        """name → a, the input the rule saw, of the latest backward (or its statistic)."""
        return self._latest().input

    @property
    def output(self) -> dict:
        """name → the rule's output (keep="output"), of the latest backward (or its statistic)."""
        return self._latest().output

    @property
    def names(self) -> list[str]:
        """The names recorded by the latest backward, in the order its backward reached them."""
        return self._latest().names

    def series(self, name: str, what: str = "delta") -> torch.Tensor:
        """`name`'s recorded values over the kept steps, stacked: (steps, *value shape); NaN where a step
        did not record `name`. Meant for statistics (reduce set)."""
        if what not in self.keep:
            raise InputError(f"tape.series: {what!r} is not kept (keep={self.keep})")
        values = [getattr(step, what).get(name) for step in self.steps]
        present = [v for v in values if v is not None]
        if not present:
            raise InputError(f"tape.series: no step recorded {name!r}; recorded: {sorted(self._all_names())}")
        if len({tuple(v.shape) for v in present}) > 1:
            raise InputError(
                f"tape.series: {name!r}'s values differ in shape between steps ({sorted({tuple(v.shape) for v in present})}: "
                "whole tensors or per-sample norms of batches of different sizes); read them from tape.steps"
            )
        blank = torch.full_like(present[0], math.nan, dtype=present[0].dtype if present[0].is_floating_point() else torch.float)
        return torch.stack([blank if v is None else v.to(blank.dtype) for v in values])

    def _all_names(self) -> set:
        return {name for step in self.steps for name in step.names}

    def __repr__(self) -> str:
        return f"Tape(keep={self.keep}, reduce={self.reduce!r}, {len(self.steps)} steps)"


def tape(model: torch.nn.Module, keep: Iterable[str] = ("delta", "input"), reduce: Reduce = None, *,
         history: Optional[bool] = None) -> Tape:
    """Record δ (and a, the outputs) at every parametric rule's backward under `model`, layer by layer.

    Args:
        model: the module to watch (its rules must be ours: built from manual_backprop.nn or converted).
        keep: which of "delta", "input", "output" to record.
        reduce: None (whole tensors), "norm", "mean_abs", "rms", "per_sample_norm" or a callable
            tensor → tensor applied to each recorded tensor.
        history: keep every backward's step (default: only when `reduce` is set).

    Returns a context manager: `with tape(model) as t: ...`; read `t.delta`, `t.input`, `t.output`,
    `t.names`, `t.steps`, `t.series(name)`.
    """
    return Tape(model, keep, reduce, history)
