"""The model zoo for convert / mode / parity tests: small models users actually write.

Each `ZooCase` builds a model, inputs, a target and a loss, and names the rule nodes
(`<Rule>Backward`) that must appear in the graph when the model runs on our rules,
through convert (`convert_nodes`) and through `manual_functions()` (`mode_nodes`).
The two differ where a custom forward calls torch functions directly: convert cannot
see those calls, the mode can.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ZooCase:
    name: str
    make_model: Callable[[], nn.Module]
    input_shapes: tuple[tuple[int, ...], ...]
    make_target: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    make_loss: Callable[[], Callable]
    convert_nodes: frozenset[str]
    mode_nodes: frozenset[str] = field(default=frozenset())

    def build(self, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
        torch.manual_seed(seed)
        model = self.make_model().to(device=device, dtype=dtype)
        generator = torch.Generator().manual_seed(seed + 1)
        inputs = tuple(torch.randn(s, generator=generator, dtype=dtype).to(device) for s in self.input_shapes)
        with torch.no_grad():
            output = model(*inputs)
        target = self.make_target(output, generator)
        target = target.to(device) if isinstance(target, torch.Tensor) else target
        loss = self.make_loss()
        if isinstance(loss, nn.Module):  # pos_weight etc. in the model's dtype (our rules refuse mixed dtypes)
            loss = loss.to(device=device, dtype=dtype)
        return model, inputs, target, loss

    def __repr__(self) -> str:  # readable pytest ids
        return self.name


def regression_target(output, generator):
    return torch.randn(output.shape, generator=generator, dtype=output.dtype)


def binary_target(output, generator):
    return torch.randint(2, output.shape, generator=generator).to(output.dtype)


def class_target(output, generator):
    return torch.randint(output.shape[-1], output.shape[:-1], generator=generator)


def mlp(activation: nn.Module, bias: bool = True, out: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 7, bias=bias), activation, nn.Linear(7, out, bias=bias))


ACTIVATIONS = {
    "Sigmoid": (nn.Sigmoid, "SigmoidBackward"),
    "Tanh": (nn.Tanh, "TanhBackward"),
    "ReLU": (nn.ReLU, "ReLUBackward"),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.2), "LeakyReLUBackward"),
    "ELU": (lambda: nn.ELU(0.7), "ELUBackward"),
    "Softplus": (lambda: nn.Softplus(beta=2.0, threshold=5.0), "SoftplusBackward"),
    "SiLU": (nn.SiLU, "SiLUBackward"),
    "GELU": (nn.GELU, "GELUBackward"),
    "GELU-tanh": (lambda: nn.GELU(approximate="tanh"), "GELUBackward"),
    "Identity": (nn.Identity, None),  # returns its input: no node, converted or not
}

_MLP_NODES = {"LinearBackward", "MSELossBackward"}


class Heads(nn.Module):
    """A custom trunk with functional calls in forward, and a ModuleDict of heads."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.mix = nn.Linear(8, 8, bias=False)
        self.heads = nn.ModuleDict({"classes": nn.Linear(8, 4), "value": nn.Sequential(nn.Linear(8, 2), nn.Sigmoid())})

    def forward(self, x):
        h = F.relu(self.mix(self.trunk(x)))  # a functional call: only the mode sees it
        h = h * torch.sigmoid(h)  # a hand-rolled SiLU, also functional
        return {name: head(h) for name, head in self.heads.items()}


def heads_loss():
    def loss(output, target):
        return F.cross_entropy(output["classes"], target["classes"]) + F.mse_loss(output["value"], target["value"])

    return loss


def heads_target(output, generator):
    return {
        "classes": torch.randint(4, output["classes"].shape[:-1], generator=generator),
        "value": torch.rand(output["value"].shape, generator=generator, dtype=output["value"].dtype),
    }


class SharedTwice(nn.Module):
    """One Linear applied twice, and registered under two names."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.alias = self.shared  # same module under a second name
        self.act = nn.Tanh()
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.act(self.shared(self.inp(x)))
        h = self.act(self.alias(h))
        return self.out(h)


class TiedWeights(nn.Module):
    """Two Linear modules sharing one weight Parameter (embedding-style tying)."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(5, 3)
        self.decode = nn.Linear(3, 5)
        self.decode.weight = nn.Parameter(self.encode.weight.detach().T.clone())
        self.act = nn.ELU()
        self.again = nn.Linear(5, 3)
        self.again.weight = self.encode.weight  # tied

    def forward(self, x):
        return self.again(self.act(self.decode(self.act(self.encode(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm block on (batch, seq, features): attention with nn.Softmax, then an MLP with GELU.

    LayerNorm runs on our rule (norm branch); the residual additions and the
    attention matmuls are plain tensor ops.
    """

    def __init__(self, features: int = 8, hidden: int = 16, classes: int = 3):
        super().__init__()
        self.norm1 = nn.LayerNorm(features)
        self.q, self.k, self.v = nn.Linear(features, features), nn.Linear(features, features), nn.Linear(features, features)
        self.attend = nn.Softmax(dim=-1)
        self.norm2 = nn.LayerNorm(features)
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, features))
        self.classify = nn.Linear(features, classes)

    def forward(self, x):
        h = self.norm1(x)
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / math.sqrt(h.shape[-1])
        x = x + self.attend(scores) @ self.v(h)
        x = x + self.mlp(self.norm2(x))
        return self.classify(x.mean(dim=1))


def _case(name, make_model, shapes, target, loss, convert_nodes, mode_nodes=None):
    convert_nodes = frozenset(convert_nodes)
    return ZooCase(name, make_model, shapes, target, loss, convert_nodes, frozenset(mode_nodes or convert_nodes))


ZOO: list[ZooCase] = [
    *[
        _case(
            f"mlp-{name}",
            (lambda make=make: mlp(make())),
            ((6, 5),),
            regression_target,
            nn.MSELoss,
            _MLP_NODES | ({node} - {None}),
        )
        for name, (make, node) in ACTIVATIONS.items()
    ],
    _case(
        "mlp-cross-entropy",
        lambda: mlp(nn.ReLU(), out=4),
        ((6, 5),),
        class_target,
        lambda: nn.CrossEntropyLoss(label_smoothing=0.1),
        {"LinearBackward", "ReLUBackward", "CrossEntropyBackward"},
    ),
    _case(
        "mlp-bce",
        lambda: nn.Sequential(mlp(nn.Tanh()), nn.Sigmoid()),
        ((6, 5),),
        binary_target,
        nn.BCELoss,
        {"LinearBackward", "TanhBackward", "SigmoidBackward", "BinaryCrossEntropyBackward"},
    ),
    _case(
        "mlp-bce-logits",
        lambda: mlp(nn.SiLU()),
        ((6, 5),),
        binary_target,
        lambda: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 0.5])),
        {"LinearBackward", "SiLUBackward", "BinaryCrossEntropyWithLogitsBackward"},
    ),
    _case(
        "mlp-softmax-mse",
        lambda: nn.Sequential(mlp(nn.LeakyReLU()), nn.Softmax(dim=1)),
        ((6, 5),),
        regression_target,
        lambda: nn.MSELoss(reduction="sum"),
        {"LinearBackward", "LeakyReLUBackward", "SoftmaxBackward", "MSELossBackward"},
    ),
    _case(
        "mlp-no-bias",
        lambda: nn.Sequential(mlp(nn.Tanh(), bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False)),
        ((6, 5),),
        regression_target,
        nn.MSELoss,
        {"LinearBackward", "TanhBackward", "ReLUBackward", "MSELossBackward"},
    ),
    _case(
        "nested-heads",
        Heads,
        ((5, 6),),
        heads_target,
        heads_loss,
        {"LinearBackward", "TanhBackward", "SigmoidBackward"},
        {"LinearBackward", "TanhBackward", "SigmoidBackward", "ReLUBackward", "CrossEntropyBackward", "MSELossBackward"},
    ),
    _case("shared-linear", SharedTwice, ((5, 4),), regression_target, nn.MSELoss, {"LinearBackward", "TanhBackward", "MSELossBackward"}),
    _case("tied-weights", TiedWeights, ((5, 5),), regression_target, nn.MSELoss, {"LinearBackward", "ELUBackward", "MSELossBackward"}),
    _case(
        "transformer-block",
        TransformerBlock,
        ((2, 5, 8),),
        class_target,
        nn.CrossEntropyLoss,
        {"LinearBackward", "SoftmaxBackward", "GELUBackward", "CrossEntropyBackward", "LayerNormBackward"},
    ),
]

DTYPES = [torch.float64, torch.float32]
DEVICES = ["cpu", "cuda"]
