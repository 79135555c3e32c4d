"""The fully connected network of the notes, on our rules or on stock torch layers.

    z(l+1) = W(l) a(l) + b(l),   a(l+1) = σ(z(l+1)),   the last layer linear (σ = identity)

`build_network` is the one place that builds it, so switching the manual backend to
a fused whole-network rule later is a change here only. Both backends build the same
`nn.Sequential` (Linear, activation, Linear, ...), so their state_dict keys match and
weights can be copied between them.
"""

from __future__ import annotations

from typing import Sequence

import torch

import manual_backprop.nn as mnn

BACKENDS = ("manual", "autograd")

# name -> (module on our rules, stock torch module). One table for every name we accept.
ACTIVATIONS: dict[str, tuple[type[torch.nn.Module], type[torch.nn.Module]]] = {
    "sigmoid": (mnn.Sigmoid, torch.nn.Sigmoid),
    "tanh": (mnn.Tanh, torch.nn.Tanh),
    "relu": (mnn.ReLU, torch.nn.ReLU),
    "leaky_relu": (mnn.LeakyReLU, torch.nn.LeakyReLU),
    "elu": (mnn.ELU, torch.nn.ELU),
    "softplus": (mnn.Softplus, torch.nn.Softplus),
    "silu": (mnn.SiLU, torch.nn.SiLU),
    "gelu": (mnn.GELU, torch.nn.GELU),
    "identity": (mnn.Identity, torch.nn.Identity),
}


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    return backend


def activation_class(name: str, backend: str) -> type[torch.nn.Module]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}")
    manual, stock = ACTIVATIONS[name]
    return manual if check_backend(backend) == "manual" else stock


def check_sizes(in_features: int, hidden_sizes: Sequence[int], out_features: int) -> list[int]:
    """All layer widths [in, *hidden, out], each a positive int."""
    named = [("in_features", in_features)]
    named += [(f"hidden_sizes[{i}]", h) for i, h in enumerate(hidden_sizes)]
    named += [("out_features", out_features)]
    for name, size in named:
        # bool is an int in Python; a width of True is a config mistake, not 1.
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"{name} must be a positive integer; got {size!r} (hidden_sizes={list(hidden_sizes)})")
    return [size for _, size in named]


def build_network(
    in_features: int,
    hidden_sizes: Sequence[int],
    out_features: int,
    activation: str = "relu",
    backend: str = "manual",
) -> torch.nn.Sequential:
    """Linear → σ → ... → Linear with widths [in_features, *hidden_sizes, out_features].

    backend "manual" uses `manual_backprop.nn` (every backward ours); "autograd" the same
    layers from `torch.nn`. The output layer has no activation: the loss applies the
    output nonlinearity (sigmoid / softmax), which is what gives δ(L) = ŷ − y.
    """
    sizes = check_sizes(in_features, hidden_sizes, out_features)
    act = activation_class(activation, backend)
    linear = mnn.Linear if backend == "manual" else torch.nn.Linear
    layers: list[torch.nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(act())
    return torch.nn.Sequential(*layers)
