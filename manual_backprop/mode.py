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
composite functions we have no rule for (F.instance_norm: everything inside them), runs
on stock torch.
TorchFunctionMode disables itself while a handler runs, so our functional code, which
calls torch ops, does not re-enter the mode; and since an autograd.Function's forward
runs with grad off, a manual module's own F.linear inside the mode is not routed twice.
"""

from __future__ import annotations

import functools
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


# norm branch: torch.* spellings whose signatures differ from torch.nn.functional's


def _torch_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):
    return MF.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _torch_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return MF.layer_norm(input, normalized_shape, weight, bias, eps)


def _torch_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return MF.group_norm(input, num_groups, weight, bias, eps)


def _torch_dropout(input, p, train):
    return MF.dropout(input, p, train)


def _with_indices(ours: Callable) -> Callable:
    """F.max_pool2d_with_indices & co.: ours with return_indices=True (same signature)."""

    @functools.wraps(ours)
    def call(input, *args, **kwargs):
        kwargs["return_indices"] = True
        return ours(input, *args, **kwargs)

    return call


def _conv_and_pool_routes() -> list:
    from torch._C import _nn

    routes = [("pad", MF.pad, [F.pad])]
    for d in (1, 2, 3):
        conv, conv_t = f"conv{d}d", f"conv_transpose{d}d"
        routes += [(conv, getattr(MF, conv), [getattr(F, conv), getattr(torch, conv)]),
                   (conv_t, getattr(MF, conv_t), [getattr(F, conv_t), getattr(torch, conv_t)])]
        name = f"max_pool{d}d"
        routes += [(name, getattr(MF, name), [getattr(F, name), getattr(torch, name)]),
                   (name, _with_indices(getattr(MF, name)), [getattr(F, f"{name}_with_indices")])]
        name = f"adaptive_max_pool{d}d"  # torch.adaptive_max_pool1d returns the indices too
        with_indices = [getattr(F, f"{name}_with_indices")] + ([torch.adaptive_max_pool1d] if d == 1 else [])
        routes += [(name, getattr(MF, name), [getattr(F, name)]), (name, _with_indices(getattr(MF, name)), with_indices)]
        for kind in ("avg_pool", "adaptive_avg_pool"):
            name = f"{kind}{d}d"
            aliases = {getattr(F, name), getattr(torch, name, None), getattr(_nn, name, None)} - {None}
            routes.append((name, getattr(MF, name), list(aliases)))
    return routes


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
        # norm branch: normalisation, dropout, the activations CNNs use
        ("batch_norm", MF.batch_norm, [F.batch_norm]),
        ("batch_norm", _torch_batch_norm, [torch.batch_norm]),
        ("layer_norm", MF.layer_norm, [F.layer_norm]),
        ("layer_norm", _torch_layer_norm, [torch.layer_norm]),
        ("group_norm", MF.group_norm, [F.group_norm]),
        ("group_norm", _torch_group_norm, [torch.group_norm]),
        ("rms_norm", MF.rms_norm, [F.rms_norm, torch.rms_norm]),
        ("dropout", MF.dropout, [F.dropout]),
        ("dropout", _torch_dropout, [torch.dropout]),
        ("dropout1d", MF.dropout1d, [F.dropout1d]),
        ("dropout2d", MF.dropout2d, [F.dropout2d]),
        ("dropout3d", MF.dropout3d, [F.dropout3d]),
        ("relu6", MF.relu6, [F.relu6]),
        ("hardtanh", MF.hardtanh, [F.hardtanh]),
        ("hardsigmoid", MF.hardsigmoid, [F.hardsigmoid]),
        ("hardswish", MF.hardswish, [F.hardswish]),
        ("mish", MF.mish, [F.mish]),
        ("prelu", MF.prelu, [F.prelu, torch.prelu, T.prelu]),
        # convolution and pooling; F.conv2d is torch.conv2d, F.max_pool2d dispatches on
        # return_indices to F.max_pool2d_with_indices or torch.max_pool2d, all seen by the mode
        *_conv_and_pool_routes(),
        # embedding and attention
        ("embedding", _embedding, [F.embedding]),
        ("scaled_dot_product_attention", MF.scaled_dot_product_attention, [F.scaled_dot_product_attention]),
        ("multi_head_attention_forward", MF.multi_head_attention_forward, [F.multi_head_attention_forward]),
        # recurrent: what torch.nn.RNN, LSTM, GRU and the cells end in (torch._VF.lstm is torch.lstm)
        *[(name, getattr(MF, name), [getattr(torch, name)]) for name in (
            "lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell")],
    ]
    return {torch_fn: (name, ours) for name, ours, torch_fns in table for torch_fn in torch_fns}


ROUTES = _routes()  # torch function → (name, our function with the same signature)


def _tensors(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):  # torch.lstm's hx = (h0, c0) and list of weights
            yield from (v for v in value if isinstance(v, torch.Tensor))


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
