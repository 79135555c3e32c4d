"""MLP: a fully connected network run by one fused rule (`manual_backprop.rules.mlp.MLP`).

Parameters live in `layers`, a ModuleList of Linear layers, so the state_dict keys
are `layers.{k}.weight` / `layers.{k}.bias` for the k-th Linear. The equivalent
`nn.Sequential(Linear, act, Linear, act, …, Linear[, out_act])` numbers its Linears
by position instead (`0.weight`, `2.weight`, …); `load_sequential_state_dict`,
`from_sequential` and `to_sequential` convert between the two.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from manual_backprop import _checks
from manual_backprop._amp import autocast_inputs, autocast_on
from manual_backprop._checks import InputError
from manual_backprop.nn.activation import ACTIVATIONS
from manual_backprop.nn.linear import Linear
from manual_backprop.rules import _native
from manual_backprop.rules.mlp import activation as layer_activation
from manual_backprop.rules.mlp import mlp, native_operator


def _resolve(activation) -> torch.nn.Module:
    """A name, an Elementwise rule or an activation module -> a stock torch.nn module holding its settings."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise InputError(f"MLP: unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[activation].stock()
    for entry in ACTIVATIONS.values():
        if activation is entry.rule:
            return entry.stock()
        if isinstance(activation, entry.stock):  # torch's module or ours (a subclass): keep its settings
            return entry.stock(*entry.settings_of(activation))
    raise InputError(
        f"MLP: activation must be one of {sorted(ACTIVATIONS)}, an Elementwise rule of "
        f"manual_backprop.rules or a matching torch.nn activation module, got {activation!r}"
    )


def _rule_of(module: torch.nn.Module | None):
    if module is None:
        return None
    entry = next(entry for entry in ACTIVATIONS.values() if type(module) is entry.stock)
    return layer_activation(entry.rule, *entry.settings_of(module))


class MLP(torch.nn.Module):
    """Linear → activation → … → Linear [→ output_activation], forward and backward in one rule.

    Args:
        sizes: layer widths [in, hidden…, out]; at least two.
        activation: hidden activation: a name ("sigmoid", "tanh", "relu", "leaky_relu",
            "elu", "softplus", "silu", "gelu", "identity", "relu6", "hardtanh", "hardsigmoid",
            "hardswish", "mish"), an Elementwise rule
            (`manual_backprop.rules.Sigmoid`) or an activation module (`torch.nn.LeakyReLU(0.2)`).
        output_activation: the same choices, or None for raw outputs (logits for the
            *WithLogits / CrossEntropy losses).
        bias: whether every Linear has a bias.

    Shape: input (*, sizes[0]); output (*, sizes[-1]).

    Parameters are initialised as torch.nn.Linear does, in the same order, so with the
    same seed an MLP starts from the same weights as the equivalent nn.Sequential.
    """

    def __init__(self, sizes: Sequence[int], activation="relu", output_activation=None, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        sizes = list(sizes)
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes):
            raise InputError(f"MLP: sizes must list at least two non-negative int widths [in, ..., out], got {sizes}")
        self.sizes = sizes
        # Kept in a list, not as submodules: they hold settings only, and the fused rule runs them.
        self._activations = [_resolve(activation), None if output_activation is None else _resolve(output_activation)]
        self.bias = bias
        self.layers = torch.nn.ModuleList(
            Linear(n_in, n_out, bias=bias, device=device, dtype=dtype) for n_in, n_out in zip(sizes, sizes[1:])
        )
        hidden = _rule_of(self.activation)
        self._rule_layers = (hidden,) * (len(sizes) - 2) + (_rule_of(self.output_activation),)
        self._native_code = _native.encode(self._rule_layers)  # (kinds, params) for the native rule, or None

    @property
    def activation(self) -> torch.nn.Module:
        """The hidden activation, as the equivalent torch.nn module (settings only; the rule runs it)."""
        return self._activations[0]

    @property
    def output_activation(self) -> torch.nn.Module | None:
        return self._activations[1]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weights_and_biases = self._weights_and_biases()
        # The common case, straight to the native operator with the activation codes encoded once: at course
        # sizes each Python line on the way costs microseconds of a 0.1 ms step. The operator checks every shape
        # before it reads memory; where it refuses, MLP's own checks name the bad input.
        code = self._native_code
        if code is not None and type(self)._fused is MLP._fused and not autocast_on():
            op = native_operator()
            if op is not None:
                try:
                    return op(input, weights_and_biases, *code)
                except RuntimeError:
                    self._check_width(input)
                    self._check_dtype(input, weights_and_biases)
                    raise
        self._check_width(input)
        # Autocast casts every Linear's inputs; the activations then run in that dtype, as after a stock Linear.
        if autocast_on():
            input, *weights_and_biases = autocast_inputs("linear", input.device, input, *weights_and_biases)
        self._check_dtype(input, weights_and_biases)
        return self._fused(input, *weights_and_biases)

    def _check_width(self, input: torch.Tensor) -> None:
        if input.dim() == 0 or input.shape[-1] != self.sizes[0]:
            raise InputError(
                f"MLP: input's last dimension must equal sizes[0]={self.sizes[0]}, got input of shape {tuple(input.shape)}"
            )

    def _check_dtype(self, input: torch.Tensor, weights_and_biases: list) -> None:
        if input.dtype != weights_and_biases[0].dtype:
            _checks.same_dtype("MLP", input=input, weight=weights_and_biases[0])

    def _fused(self, input: torch.Tensor, *weights_and_biases: torch.Tensor | None) -> torch.Tensor:
        """The fused rule on checked, autocast inputs (a learning-rule plugin runs its own variant here)."""
        return mlp(input, self._rule_layers, *weights_and_biases)

    def _weights_and_biases(self) -> list:
        """W₀, b₀, W₁, b₁, … as the Linears hold them now (torch.func.functional_call's stand-ins too).

        Read from each Linear's parameter dict: a third of the time of attribute access, which
        shows at course sizes. A parametrized Linear (torch.nn.utils.parametrize) computes its
        weight, so it is read through the attribute.
        """
        out = []
        for layer in self._modules["layers"]._modules.values():  # not self.layers: Module.__getattr__ is Python
            params = layer._parameters
            if "weight" in params and "bias" in params:
                out += (params["weight"], params["bias"])
            else:
                out += (layer.weight, layer.bias)
        return out

    def extra_repr(self) -> str:
        out = "None" if self.output_activation is None else repr(self.output_activation)
        return f"sizes={self.sizes}, activation={self.activation!r}, output_activation={out}, bias={self.bias}"

    # ------------------------------------------------ the equivalent nn.Sequential

    def to_sequential(self) -> torch.nn.Sequential:
        """The equivalent stock `nn.Sequential` (torch's modules), with a copy of these parameters."""
        modules: list[torch.nn.Module] = []
        for k, layer in enumerate(self.layers):
            linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=self.bias,
                                     device=layer.weight.device, dtype=layer.weight.dtype)
            modules.append(linear)
            if k < len(self.layers) - 1:
                modules.append(_resolve(self.activation))
        if self.output_activation is not None:
            modules.append(_resolve(self.output_activation))
        sequential = torch.nn.Sequential(*modules)
        sequential.load_state_dict(self.sequential_state_dict())
        return sequential

    def sequential_state_dict(self) -> dict[str, torch.Tensor]:
        """This state_dict under the keys of `to_sequential()`: `0.weight`, `0.bias`, `2.weight`, …"""
        return {f"{2 * k}.{name}": tensor.detach().clone() for k, layer in enumerate(self.layers)
                for name, tensor in layer.state_dict().items()}

    def load_sequential_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Load the state_dict of an equivalent nn.Sequential.

        Its Linear layers are found by position: the k-th distinct module prefix that
        holds a `weight` becomes `layers.{k}`, whatever sits between them (activations,
        Dropout…). Returns what `load_state_dict` returns.
        """
        prefixes = list(dict.fromkeys(key.rsplit(".", 1)[0] for key in state_dict if key.endswith(".weight")))
        if strict and len(prefixes) != len(self.layers):
            raise InputError(
                f"MLP: the state_dict holds {len(prefixes)} weighted layers ({prefixes}), "
                f"this MLP has {len(self.layers)} Linear layers"
            )
        renamed = {f"layers.{prefixes.index(prefix)}.{name}": tensor
                   for key, tensor in state_dict.items()
                   for prefix, name in [key.rsplit(".", 1)] if prefix in prefixes}
        return self.load_state_dict(renamed, strict=strict)

    @classmethod
    def from_sequential(cls, sequential: torch.nn.Sequential) -> "MLP":
        """An MLP equal to `sequential` = (Linear, act, Linear, act, …, Linear[, out_act]), parameters copied.

        The hidden activations must all be the same module type and settings; an
        `nn.Sequential` of our modules (`manual_backprop.nn`) works as well as torch's.
        """
        modules = list(sequential)
        linears = [m for m in modules if isinstance(m, torch.nn.Linear)]
        layout = "Linear, act, Linear, act, ..., Linear[, out_act]"
        if not linears or not isinstance(modules[0], torch.nn.Linear):
            raise InputError(f"MLP.from_sequential: expected {layout}, got {sequential}")
        hidden = [modules[i + 1] for i, m in enumerate(modules[:-1]) if isinstance(m, torch.nn.Linear)
                  and m is not linears[-1]]
        output = modules[-1] if not isinstance(modules[-1], torch.nn.Linear) else None
        expected_len = 2 * len(linears) - 1 + (output is not None)
        if len(modules) != expected_len or any(isinstance(m, torch.nn.Linear) for m in hidden):
            raise InputError(f"MLP.from_sequential: expected {layout}, got {sequential}")
        resolved = [_resolve(m) for m in hidden]
        if len({(type(m), _rule_of(m)[3]) for m in resolved}) > 1:
            raise InputError(f"MLP.from_sequential: hidden activations differ ({hidden}); the MLP uses one")
        biases = {m.bias is not None for m in linears}
        if len(biases) != 1:
            raise InputError("MLP.from_sequential: either every Linear has a bias or none does")
        sizes = [linears[0].in_features] + [m.out_features for m in linears]
        weight = linears[0].weight
        network = cls(sizes, activation=resolved[0] if resolved else "identity", output_activation=output,
                  bias=biases.pop(), device=weight.device, dtype=weight.dtype)
        network.load_sequential_state_dict(sequential.state_dict())
        return network
