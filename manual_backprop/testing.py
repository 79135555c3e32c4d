"""Parity of a user's model on our rules against stock autograd, as one call for pytest.

    from manual_backprop.testing import assert_grad_parity
    assert_grad_parity(model, x, y, torch.nn.CrossEntropyLoss())             # through convert
    assert_grad_parity(model, x, y, F.cross_entropy, via="manual_functions")  # through the mode

Both runs start from identical parameters (deep copies of `model`, which is left
untouched) and the same RNG state (so dropout draws the same masks). Compared: the
loss, every output tensor, every parameter gradient (by qualified name) and the
gradient of every floating-point input. The manual run must also contain at least
one of our rules' backward nodes, so a model on which nothing was converted cannot
pass as "equal to autograd".
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils._pytree import tree_leaves

from manual_backprop.convert import Report, convert, report
from manual_backprop.mode import manual_functions
from manual_backprop.registry import Registry
from manual_backprop.rules import _native

__all__ = ["ParityResult", "TensorParity", "assert_grad_parity", "grad_parity", "rule_nodes"]

VIAS = ("convert", "manual_functions")

# (rtol, atol) by dtype when none are given: torch.testing's defaults.
DEFAULT_TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


@dataclass(frozen=True)
class TensorParity:
    """One compared tensor: its name ("loss", "output[0]", "grad input[0]", "grad fc.weight").

    max_abs: the largest |ours − stock|. max_rel: the largest |ours − stock| / |stock|, where values
    within atol of 0 on both sides count as equal zeros (relative error 0), and a stock 0 that ours
    misses by more than atol counts as inf.
    """

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


@dataclass(frozen=True)
class ParityResult:
    rows: tuple[TensorParity, ...]
    rule_nodes: Counter  # our rules' backward nodes in the manual run's graph, by name
    via: str
    conversion: Report | None = None  # via="convert": what ran where
    routed: Counter = field(default_factory=Counter)  # via="manual_functions": calls routed, by name

    @property
    def failures(self) -> list[TensorParity]:
        return [row for row in self.rows if not row.ok]

    @property
    def ok(self) -> bool:
        return not self.failures and bool(self.rule_nodes)

    def __str__(self) -> str:
        cells = [("tensor", "shape", "max abs err", "max rel err", "")] + [
            (r.name, str(tuple(r.shape)), f"{r.max_abs:.3e}", f"{r.max_rel:.3e}", ("OK" if r.ok else "FAIL") + (f"  {r.note}" if r.note else ""))
            for r in self.rows
        ]
        widths = [max(len(c[i]) for c in cells) for i in range(4)]
        lines = ["  ".join(c[i].ljust(widths[i]) for i in range(4)) + "  " + c[4] for c in cells]
        nodes = ", ".join(f"{n}×{k}" for n, k in sorted(self.rule_nodes.items())) or "none (nothing ran on manual rules)"
        return "\n".join(line.rstrip() for line in lines) + f"\nmanual backward nodes: {nodes}"


def rule_nodes(tensor: torch.Tensor) -> Counter:
    """Names of the custom autograd.Function backward nodes (our rules) in `tensor`'s graph."""
    found: Counter = Counter()
    stack, seen = [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction) or _native.is_per_layer_node(node):
            found[type(node).__name__] += 1  # a native per-layer node carries its Python rule's name
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _compare(name: str, manual, stock, rtol, atol) -> TensorParity:
    if manual is None or stock is None:
        ok = manual is None and stock is None
        shape = tuple((manual if manual is not None else stock).shape) if not ok else ()
        which = "manual" if manual is None else "stock"
        return TensorParity(name, shape, math.nan, math.nan, ok, "" if ok else f"no gradient in the {which} run")
    if manual.shape != stock.shape or manual.dtype != stock.dtype:
        note = f"manual {tuple(manual.shape)} {manual.dtype} vs stock {tuple(stock.shape)} {stock.dtype}"
        return TensorParity(name, tuple(stock.shape), math.inf, math.inf, False, note)
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(stock.dtype, (0.0, 0.0))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    m, s = manual.detach().to(torch.float64), stock.detach().to(torch.float64)
    equal = (m == s) | (m.isnan() & s.isnan())  # also ±inf on both sides, where m − s is nan
    diff = torch.where(equal, 0.0, (m - s).abs())
    # A gradient that is zero in exact arithmetic (a bias before a BatchNorm) comes out as rounding noise
    # below atol on both sides, or exactly 0 on one: that is agreement, not an infinite relative error.
    both_zero = equal | ((m.abs() <= atol) & (s.abs() <= atol))
    rel = torch.where(both_zero, 0.0, torch.where(s != 0, diff / s.abs(), math.inf))
    max_abs = diff.max().item() if diff.numel() else 0.0
    max_rel = rel.max().item() if rel.numel() else 0.0
    ok = torch.allclose(m, s, rtol=rtol, atol=atol, equal_nan=True)
    return TensorParity(name, tuple(stock.shape), max_abs, max_rel, ok)


def _as_tuple(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _run(model, inputs, target, loss_fn, seed):
    """Forward, loss, backward from a fixed RNG state; returns (loss, outputs, inputs with grads)."""
    inputs = tuple(
        x.detach().clone().requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        for x in inputs
    )
    cuda = sorted({t.device.index or 0 for t in (*model.parameters(), *tree_leaves(inputs)) if isinstance(t, torch.Tensor) and t.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        output = model(*inputs)
        loss = loss_fn(output, target)
    loss.backward()
    return loss, output, inputs


def grad_parity(
    model: torch.nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    target,
    loss_fn: Callable,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    registry: Registry | str | None = None,
    via: str = "convert",
    seed: int = 0,
) -> ParityResult:
    """Compare `model` on our rules with stock autograd; returns the table (raises nothing).

    via: "convert" (a converted copy; a loss_fn that is a module is converted too) or
    "manual_functions" (an unconverted copy run under `manual_functions()`).
    rtol/atol: None picks torch.testing's defaults for each tensor's dtype.
    """
    if via not in VIAS:
        raise ValueError(f"via must be one of {VIAS}, got {via!r}")
    inputs = _as_tuple(inputs)
    stock_model, stock_loss_fn = copy.deepcopy(model), copy.deepcopy(loss_fn) if isinstance(loss_fn, torch.nn.Module) else loss_fn
    stock_loss, stock_out, stock_in = _run(stock_model, inputs, target, stock_loss_fn, seed)

    conversion, routed = None, Counter()
    if via == "convert":
        manual_model = convert(model, registry=registry)
        manual_loss_fn = convert(loss_fn, registry=registry) if isinstance(loss_fn, torch.nn.Module) else loss_fn
        conversion = report(manual_model, registry=registry)
        manual_loss, manual_out, manual_in = _run(manual_model, inputs, target, manual_loss_fn, seed)
    else:
        manual_model, manual_loss_fn = copy.deepcopy(model), copy.deepcopy(stock_loss_fn)
        with manual_functions() as mode:
            manual_loss, manual_out, manual_in = _run(manual_model, inputs, target, manual_loss_fn, seed)
        routed = mode.routed

    rows = [_compare("loss", manual_loss, stock_loss, rtol, atol)]
    manual_leaves, stock_leaves = tree_leaves(manual_out), tree_leaves(stock_out)
    rows += [
        _compare(f"output[{i}]", m, s, rtol, atol)
        for i, (m, s) in enumerate(zip(manual_leaves, stock_leaves))
        if isinstance(s, torch.Tensor)
    ]
    rows += [
        _compare(f"grad input[{i}]", m.grad, s.grad, rtol, atol)
        for i, (m, s) in enumerate(zip(manual_in, stock_in))
        if isinstance(s, torch.Tensor) and s.requires_grad
    ]
    manual_params = dict(manual_model.named_parameters())
    for name, s in stock_model.named_parameters():
        rows.append(_compare(f"grad {name}", manual_params[name].grad, s.grad, rtol, atol))
    return ParityResult(tuple(rows), rule_nodes(manual_loss), via, conversion, routed)


def assert_grad_parity(
    model: torch.nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    target,
    loss_fn: Callable,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    registry: Registry | str | None = None,
    via: str = "convert",
    seed: int = 0,
) -> ParityResult:
    """Assert that `model` gives autograd's loss, outputs and gradients on our rules.

    On failure the AssertionError names each mismatching tensor with its max absolute
    and relative error (and fails if no manual rule ran at all). Returns the result.
    """
    result = grad_parity(
        model, inputs, target, loss_fn, rtol=rtol, atol=atol, registry=registry, via=via, seed=seed
    )
    problems = [
        f"  {r.name} {tuple(r.shape)}: max abs err {r.max_abs:.3e}, max rel err {r.max_rel:.3e}"
        + (f" ({r.note})" if r.note else "")
        for r in result.failures
    ]
    if not result.rule_nodes:
        problems.append(f"  no manual rule ran (via={via}): nothing in this model has a rule in the registry")
    if problems:
        raise AssertionError(f"gradient parity with stock autograd failed (via={via}):\n" + "\n".join(problems))
    return result
