"""Activation modules on our rules. Each subclasses its torch.nn counterpart and overrides forward only."""

from __future__ import annotations

from typing import NamedTuple

import torch

from manual_backprop import functional as F
from manual_backprop import rules
from manual_backprop.nn.linear import Identity


class Sigmoid(torch.nn.Sigmoid):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.sigmoid(input)


class Tanh(torch.nn.Tanh):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.tanh(input)


class ReLU(torch.nn.ReLU):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.relu(input, inplace=self.inplace)


class LeakyReLU(torch.nn.LeakyReLU):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class ELU(torch.nn.ELU):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.elu(input, self.alpha, self.inplace)


class Softplus(torch.nn.Softplus):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.softplus(input, self.beta, self.threshold)


class SiLU(torch.nn.SiLU):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.silu(input, inplace=self.inplace)


class GELU(torch.nn.GELU):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.gelu(input, approximate=self.approximate)


class Softmax(torch.nn.Softmax):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


# ------------------------------------------------ the activations torchvision's CNNs use (norm branch)


class ReLU6(torch.nn.ReLU6):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.relu6(input, self.inplace)


class Hardtanh(torch.nn.Hardtanh):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(input, self.min_val, self.max_val, self.inplace)


class Hardsigmoid(torch.nn.Hardsigmoid):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.hardsigmoid(input, self.inplace)


class Hardswish(torch.nn.Hardswish):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.hardswish(input, self.inplace)


class Mish(torch.nn.Mish):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.mish(input, self.inplace)


class PReLU(torch.nn.PReLU):
    """Its weight (one slope, or one per channel) gets ∂J/∂α = Σ δ·min(z, 0) from our rule."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.prelu(input, self.weight)


# ------------------------------------------------ the activations a network may use, by name


class Activation(NamedTuple):
    """One elementwise activation: our module, its rule, and which of its settings the rule takes.

    `settings` names the module's attributes that are the rule's extra arguments; they are
    also torch's constructor arguments, in the same order. torch's module is the class ours
    subclasses, so it is not stored: `stock`.
    """

    module: type[torch.nn.Module]
    rule: type[rules.Elementwise]
    settings: tuple[str, ...] = ()

    @property
    def stock(self) -> type[torch.nn.Module]:
        """torch's module for this activation (the base class of ours)."""
        return self.module.__bases__[0]

    def settings_of(self, module: torch.nn.Module) -> tuple:
        """`module`'s settings (ours or torch's), as the rule's extra arguments."""
        return tuple(getattr(module, name) for name in self.settings)


# name -> Activation. The one table of names that MLP, the Lightning tasks and their configs accept.
ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": Activation(Sigmoid, rules.Sigmoid),
    "tanh": Activation(Tanh, rules.Tanh),
    "relu": Activation(ReLU, rules.ReLU),
    "leaky_relu": Activation(LeakyReLU, rules.LeakyReLU, ("negative_slope",)),
    "elu": Activation(ELU, rules.ELU, ("alpha",)),
    "softplus": Activation(Softplus, rules.Softplus, ("beta", "threshold")),
    "silu": Activation(SiLU, rules.SiLU),
    "gelu": Activation(GELU, rules.GELU, ("approximate",)),
    "identity": Activation(Identity, rules.Identity),
    # norm branch (relu6 before hardtanh: torch's ReLU6 subclasses Hardtanh)
    "relu6": Activation(ReLU6, rules.ReLU6),
    "hardtanh": Activation(Hardtanh, rules.Hardtanh, ("min_val", "max_val")),
    "hardsigmoid": Activation(Hardsigmoid, rules.Hardsigmoid),
    "hardswish": Activation(Hardswish, rules.Hardswish),
    "mish": Activation(Mish, rules.Mish),
}
