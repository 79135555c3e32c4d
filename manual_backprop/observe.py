"""What the rules see: δ and a at each parametric rule's backward, handed to whoever watches.

The notes' weight gradient is a sum of outer products, ∂J/∂W = Σₙ δₙ aₙᵀ. Every
parametric rule holds both factors in its backward. Per-sample gradients (each term
δₙ aₙᵀ on its own), the δ tape (δ and a layer by layer) and plugins all read those
same two tensors, so there is one mechanism, here:

    with observe.watch(model, observer):       # observer.see(seen) for each rule backward
        loss_fn(model(x), y).backward()

- `watch` puts forward pre/post hooks on each module of `model` that holds parameters
  (and removes them on exit): while such a module runs, it is the current `Call` (the
  innermost one, for nested modules; a fused MLP is one call, its layers told apart by
  `Seen.layer`).
- A parametric rule asks `observe.current()` in `setup_context`. Nobody watching: it
  gets None (one read of a module-level list), keeps nothing extra and does no extra
  work. Otherwise it keeps a, and its backward hands a `Seen` to `Call.see`.
- `Seen` carries δ, a, the rule's parameter tensors, and pure functions of the rule's:
  per-sample parameter gradients, per-sample squared norms (which need not form any
  per-sample gradient: ‖δₙ aₙᵀ‖ = ‖δₙ‖·‖aₙ‖) and, optionally, its batch-summed gradient.
- Samples lie along `Seen.batch_dim` of δ and a: `watch(..., batch_dim=)` for the whole
  model (1 for sequence-first data), changed for one call by a functional that moves the
  batch (multi-head attention works in (L, N, E): `observe.samples_in(1)`).
- A rule may be handed a view of a parameter (multi-head attention's in_proj_weight
  chunks): `Call.source` maps it back to the parameter, and the view tells where in it.
- Observers may also define `keeps(call, params)`: called in forward, each time a rule
  keeps its parameters (per-sample norms use it to find parameters used twice). An observer
  that forms some of those parameters' gradients itself from the δ and a it is handed
  (book-keeping DP-SGD: Σₙ cₙ δₙ aₙᵀ once the clip factors cₙ are known) returns one bool per
  parameter, True for those; the rule's backward then does not form their summed gradient
  (`needs`), and `.grad` is left as it was. Returning None: it forms none.

Hooks are installed only by `watch`, so ordinary training pays nothing. Under
torch.compile the rules' Python backward does not run per step, so watching a
compiled model raises instead of silently seeing nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

import torch

from manual_backprop._checks import InputError


class Observer(Protocol):
    """Anything with `see(seen)`; `keep_output` asks rules to hand over their output too."""

    keep_output: bool

    def see(self, seen: "Seen") -> None: ...


@dataclass
class Call:
    """One forward call of a watched module: its qualified name in the watched model, the module,
    and the how-many-th call of that module since `watch` began (0, 1, … for a module used twice).

    batch_dim: the dimension of δ and a that indexes samples in this call's rules (the watch's
    default; a functional that moves the batch sets its own with `samples_in`)."""

    name: str
    module: torch.nn.Module
    index: int
    observers: Sequence[Observer]
    cast_from: dict = field(default_factory=dict)  # id(autocast copy) -> the parameter it was cast from
    batch_dim: int = 0
    # Two watches over one module (a tape inside per-sample gradients): the other watches' calls of this
    # same forward call, each with its own names and observers (see `watch.__enter__`).
    also: list = field(default_factory=list)
    args_id: int = 0  # id of the forward call's args, to tell "the same call, another watch" from recursion
    # A module that ran on a PackedSequence (`packed_samples`): position n of each packed step is sample
    # packed_order[n] of the batch as the model got it (packing sorts it longest first). None: not packed.
    packed_order: torch.Tensor | None = None

    def all(self) -> list:
        """This call and the other watches' calls of the same module call."""
        return [self, *self.also]

    @property
    def keep_output(self) -> bool:
        return any(getattr(o, "keep_output", False) for c in self.all() for o in c.observers)

    def see(self, seen: "Seen") -> None:
        for observer in self.observers:
            observer.see(seen)
        for other in self.also:
            other.see(replace(seen, call=other))

    def source(self, tensor: torch.Tensor | None) -> tuple | None:
        """(name relative to the module, parameter, view) for a parameter `tensor` is, was cast from,
        or is a view of (view: the tensor whose shape, strides and storage offset say where in the
        parameter it lies; the parameter itself when it is no view); None otherwise."""
        if tensor is None:
            return None
        tensor = self.cast_from.get(id(tensor), tensor)
        base = tensor._base if tensor._base is not None else tensor
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if p is base:
                return name, p, tensor
        return None

    def parameter_name(self, tensor: torch.Tensor | None) -> str | None:
        """The name, relative to the module, of the parameter `tensor` is (or was cast from, or views), else None."""
        source = self.source(tensor)
        return None if source is None else source[0]


@dataclass
class Seen:
    """What one parametric rule saw in one backward.

    delta:  ∂J/∂(the rule's output), shaped like that output.
    input:  a, the rule's input as the rule saw it (after autocast's casts).
    output: the rule's output, if an observer asked for it (`keep_output`), else None.
    params: the rule's parameter tensors, in the order `per_sample` returns their gradients.
    layer:  "" for the module itself; "layers.3" for layer 3 inside a fused rule (the MLP).
    per_sample(delta, a):  one (N, *p.shape) tensor per entry of params (None where that entry
        is None), sample n's gradient, every dimension after the first summed inside the sample.
    sq_norms(delta, a):  (N,) Σ over params of ‖sample n's gradient‖², without forming it where
        the rule knows an identity for it.
    Both functions take δ and a with the sample dimension first (`samples_first` moves it there);
    a rule whose gradient mixes samples (BatchNorm in training mode) still reports δ and a, and
    its two functions raise `MixesSamples`.
    batch_dim:  where the samples lie in delta and input (the call's `batch_dim`, as of forward).
    grads(delta, a):  the rule's own batch-summed parameter gradients (its backward's pure function,
        ∂J/∂W = Σₙ δₙ aₙᵀ), one per entry of params; None: `per_sample(...)` summed over samples.
        With δ reweighted per sample it gives Σₙ cₙ gₙ without forming any gₙ (DP-SGD's clipping).
    """

    call: Call
    delta: torch.Tensor
    input: torch.Tensor
    params: tuple
    per_sample: Callable[[torch.Tensor, torch.Tensor], tuple]
    sq_norms: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    output: torch.Tensor | None = None
    layer: str = ""
    batch_dim: int | None = None  # None: the call's
    grads: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None

    def __post_init__(self) -> None:
        if self.batch_dim is None:
            self.batch_dim = self.call.batch_dim

    def samples_first(self) -> tuple:
        """(δ, a) with the sample dimension first, as `per_sample` and `sq_norms` take them."""
        d = self.batch_dim
        return (self.delta, self.input) if d == 0 else (self.delta.movedim(d, 0), self.input.movedim(d, 0))

    def summed(self, delta: torch.Tensor, a: torch.Tensor) -> tuple:
        """Σₙ of the per-sample gradients for δ, a with the sample dimension first, by `grads` where the rule has it."""
        if self.grads is not None:
            return self.grads(delta, a)
        return tuple(None if g is None else g.sum(0) for g in self.per_sample(delta, a))

    @property
    def name(self) -> str:
        """The qualified name of what was seen: the module's, or "<module>.layers.<k>" inside a fused rule."""
        return ".".join(part for part in (self.call.name, self.layer) if part)

    def parameter_names(self) -> tuple:
        """The parameters' qualified names in the watched model, aligned with `params` (None: not a parameter)."""
        prefix = self.call.name + "." if self.call.name else ""
        return tuple(None if (n := self.call.parameter_name(p)) is None else prefix + n for p in self.params)


class MixesSamples(InputError):
    """A rule whose parameter gradient is no sum of per-sample terms (BatchNorm in training mode)."""


def mixes_samples(reason: str) -> Callable:
    """`per_sample` / `sq_norms` for a rule whose gradient mixes samples: raises `MixesSamples(reason)`."""

    def refuse(delta, a):
        raise MixesSamples(reason)

    return refuse


_calls: list[Call] = []  # the calls now running, innermost last; empty when nobody watches
_watching: list = []  # one entry per active `watch`


def current() -> Call | None:
    """The innermost watched module call now running, or None. What a rule's setup_context asks."""
    if not _watching or not _calls:
        return None
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"manual_backprop: {_calls[-1].name or type(_calls[-1].module).__name__} is watched (tape or "
            "per-sample gradients) inside torch.compile, whose compiled backward would not report δ and a; "
            "watch the uncompiled model"
        )
    return _calls[-1]


def keep(ctx, *params: torch.Tensor | None) -> Call | None:
    """In a parametric rule's setup_context: the watching call (None: nobody watches, nothing kept).

    Keeps the rule's parameter tensors as `ctx.params` for `Seen.params`, and as `ctx.formed` which of
    them a watcher forms the gradient of itself (None: none; see `needs`).
    """
    if not _watching:  # nobody watches: every rule asks this, every step
        return None
    call = current()
    if call is not None:
        ctx.params, formed = params, None
        for each in call.all():
            for observer in each.observers:
                mine = observer.keeps(each, params) if hasattr(observer, "keeps") else None
                if mine is not None:
                    formed = mine if formed is None else [f or m for f, m in zip(formed, mine)]
        ctx.formed = formed
    return call


def needs(ctx, *need: bool) -> tuple:
    """In a watched rule's backward: its `needs_input_grad` flags for the parameters it gave `keep` (same
    order), False where a watcher forms that gradient itself from δ and a (`keeps`), so that backward
    does not compute a summed gradient the watcher would overwrite. Unwatched: the flags unchanged."""
    formed = getattr(ctx, "formed", None)
    if formed is None:
        return need
    return tuple(n and not f for n, f in zip(need, formed))


def samples_in(dim: int) -> None:
    """In a functional that moves the batch (multi-head attention works in (L, N, E)): the samples of
    the rules it runs from here on, within the current call, lie along `dim`. No-op when nobody watches."""
    if _calls:
        for call in _calls[-1].all():
            call.batch_dim = dim


def packed_samples(sorted_indices: torch.Tensor | None) -> None:
    """In a module that runs on a PackedSequence: its rules' packed rows at position n of a step belong to
    sample sorted_indices[n] (None: the batch was packed in order). No-op when nobody watches."""
    if _calls:
        for call in _calls[-1].all():
            call.packed_order = sorted_indices


def output(ctx, output: torch.Tensor) -> tuple:
    """(output,) for save_for_backward when the watching call asks for outputs (the tape's keep="output"), else ()."""
    return (output,) if ctx.call is not None and ctx.call.keep_output else ()


def cast(original: torch.Tensor, copy: torch.Tensor) -> None:
    """Remember that `copy` is autocast's copy of `original`, so the copy's gradients go to its parameter."""
    if _calls and copy is not original and original is not None:
        _calls[-1].cast_from[id(copy)] = original


class watch:
    """Context manager: while open, every parametric rule run by a module of `model` reports to `observers`.

    batch_dim: where samples lie in the model's data (0; 1 for sequence-first (L, N, E) data)."""

    def __init__(self, model: torch.nn.Module, *observers: Observer, batch_dim: int = 0) -> None:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            raise InputError(
                "manual_backprop: cannot watch a torch.compile'd model (its compiled backward does not report "
                "δ and a); watch the original module (model._orig_mod) and run it uncompiled"
            )
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"manual_backprop: watch needs a torch.nn.Module, got {type(model).__name__}")
        self.model, self.observers, self._handles, self.batch_dim = model, observers, [], batch_dim

    def __enter__(self) -> "watch":
        counts: dict = {}
        for name, module in self.model.named_modules():
            if next(module.parameters(), None) is None:  # no parameter here or below: no rule to watch
                continue

            def push(module, args, name=name):
                index = counts[name] = counts.get(name, -1) + 1
                call = Call(name, module, index, self.observers, batch_dim=self.batch_dim, args_id=id(args))
                top = _calls[-1] if _calls else None
                if top is not None and top.module is module and top.args_id == id(args):
                    # another watch already opened this very call: report to both, each under its own names
                    call.cast_from = top.cast_from
                    top.also.append(call)
                    call = top
                _calls.append(call)

            def pop(module, args, output):
                _calls.pop()

            self._handles.append(module.register_forward_pre_hook(push))
            self._handles.append(module.register_forward_hook(pop, always_call=True))
        _watching.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _watching.remove(self)
