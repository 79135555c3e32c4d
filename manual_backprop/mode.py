"""Run torch's functional calls on our rules, without converting anything.

    with manual_backprop.manual_functions() as calls:
        loss = F.cross_entropy(model(x), y)      # F.linear, F.relu, torch.sigmoid, ... → our rules
    loss.backward()
    calls.routed                                  # Counter({'linear': 3, 'relu': 2, 'cross_entropy': 1})

Functional calls inside a custom forward are invisible to `convert`; this mode sees
them through `torch.overrides.TorchFunctionMode`. Because torch.nn.Linear.forward
calls F.linear (and ReLU F.relu, ...), it also catches stock modules.

A call is routed only where it matters: grad mode on, some tensor argument requiring
grad, and no complex tensor (our rules are real-valued). Everything else, including
composite functions we have no rule for (F.layer_norm: everything inside them), runs
on stock torch.
TorchFunctionMode disables itself while a handler runs, so our functional code, which
calls torch ops, does not re-enter the mode; and since an autograd.Function's forward
runs with grad off, a manual module's own F.linear inside the mode is not routed twice.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from manual_backprop import functional as MF

__all__ = ["ManualFunctions", "manual_functions", "ROUTES"]


def _softmax(input, dim=None, dtype=None):
    # torch.softmax / Tensor.softmax take dtype third; F.softmax takes _stacklevel there.
    return MF.softmax(input, dim, dtype=dtype)


def _embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False):
    # sparse gradients have no rule: those calls stay on torch's embedding
    route = F.embedding if sparse else MF.embedding
    return route(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)


def _routes() -> dict[Callable, tuple[str, Callable]]:
    T = torch.Tensor
    table = [  # (name, our function, the torch functions it stands in for)
        ("linear", MF.linear, [F.linear]),
        ("sigmoid", MF.sigmoid, [F.sigmoid, torch.sigmoid, T.sigmoid, torch.special.expit]),
        ("tanh", MF.tanh, [F.tanh, torch.tanh, T.tanh]),
        ("relu", MF.relu, [F.relu, torch.relu, T.relu]),
        ("leaky_relu", MF.leaky_relu, [F.leaky_relu]),
        ("elu", MF.elu, [F.elu]),
        ("softplus", MF.softplus, [F.softplus]),
        ("silu", MF.silu, [F.silu]),
        ("gelu", MF.gelu, [F.gelu]),
        ("softmax", MF.softmax, [F.softmax]),
        ("softmax", _softmax, [torch.softmax, T.softmax]),
        ("mse_loss", MF.mse_loss, [F.mse_loss]),
        ("binary_cross_entropy", MF.binary_cross_entropy, [F.binary_cross_entropy]),
        ("binary_cross_entropy_with_logits", MF.binary_cross_entropy_with_logits, [F.binary_cross_entropy_with_logits]),
        ("cross_entropy", MF.cross_entropy, [F.cross_entropy]),
        # embedding and attention
        ("embedding", _embedding, [F.embedding]),
        ("scaled_dot_product_attention", MF.scaled_dot_product_attention, [F.scaled_dot_product_attention]),
        ("multi_head_attention_forward", MF.multi_head_attention_forward, [F.multi_head_attention_forward]),
    ]
    return {torch_fn: (name, ours) for name, ours, torch_fns in table for torch_fn in torch_fns}


ROUTES = _routes()  # torch function → (name, our function with the same signature)


def _tensors(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value


class ManualFunctions(TorchFunctionMode):
    """The mode behind `manual_functions()`. `routed` counts the calls that ran on our rules, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.routed: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = ROUTES.get(func)
        if route is not None and torch.is_grad_enabled():
            tensors = list(_tensors(args, kwargs))
            if any(t.requires_grad for t in tensors) and not any(t.is_complex() for t in tensors):
                name, ours = route
                self.routed[name] += 1
                return ours(*args, **kwargs)
        return func(*args, **kwargs)


def manual_functions() -> ManualFunctions:
    """Context manager: while active, the torch functions in `ROUTES` run on our rules.

    Backward may run after the block ends: the graph already holds our rules' nodes.
    """
    return ManualFunctions()
