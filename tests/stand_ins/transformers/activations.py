"""Stand-in copy of the transformers.activations classes GPT-2 and BERT use."""

import math

import torch
from torch import Tensor, nn


class PytorchGELUTanh(nn.Module):
    """A fast C implementation of the tanh approximation of the GeLU activation function."""

    def forward(self, input: Tensor) -> Tensor:
        return nn.functional.gelu(input, approximate="tanh")


class NewGELUActivation(nn.Module):
    """Implementation of the GELU activation function currently in Google BERT repo (identical to OpenAI GPT)."""

    def forward(self, input: Tensor) -> Tensor:
        return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


class GELUActivation(nn.Module):
    """Original Implementation of the GELU activation function in Google BERT repo when initially created."""

    def __init__(self, use_gelu_python: bool = False):
        super().__init__()
        if use_gelu_python:
            self.act = self._gelu_python
        else:
            self.act = nn.functional.gelu

    def _gelu_python(self, input: Tensor) -> Tensor:
        return input * 0.5 * (1.0 + torch.erf(input / math.sqrt(2.0)))

    def forward(self, input: Tensor) -> Tensor:
        return self.act(input)


class FastGELUActivation(nn.Module):
    """Applies GELU approximation that is slower than QuickGELU but more accurate."""

    def forward(self, input: Tensor) -> Tensor:
        return 0.5 * input * (1.0 + torch.tanh(input * 0.7978845608 * (1.0 + 0.044715 * input * input)))


class QuickGELUActivation(nn.Module):
    """Applies GELU approximation that is fast but somewhat inaccurate."""

    def forward(self, input: Tensor) -> Tensor:
        return input * torch.sigmoid(1.702 * input)


ACT2CLS = {
    "gelu": GELUActivation,
    "gelu_new": NewGELUActivation,
    "gelu_fast": FastGELUActivation,
    "gelu_pytorch_tanh": PytorchGELUTanh,
    "quick_gelu": QuickGELUActivation,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
}


class ClassInstantier(dict):
    def __getitem__(self, key):
        content = super().__getitem__(key)
        cls, kwargs = content if isinstance(content, tuple) else (content, {})
        return cls(**kwargs)


ACT2FN = ClassInstantier(ACT2CLS)
