"""Drop-in `torch.nn` modules on our rules.

Each subclasses its torch.nn counterpart and overrides `forward` only: same
constructor, parameters, state_dict keys and repr, and `isinstance(m, torch.nn.X)`
still holds. The math lives in `manual_backprop.functional` / `manual_backprop.rules`.
"""

from manual_backprop.nn.activation import ELU, GELU, LeakyReLU, ReLU, Sigmoid, SiLU, Softmax, Softplus, Tanh
from manual_backprop.nn.linear import Identity, Linear
from manual_backprop.nn.loss import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from manual_backprop.nn.mlp import MLP

# convolution and pooling (issue 8)
from manual_backprop.nn.conv import Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d
from manual_backprop.nn.pooling import (
    AdaptiveAvgPool1d,
    AdaptiveAvgPool2d,
    AdaptiveAvgPool3d,
    AdaptiveMaxPool1d,
    AdaptiveMaxPool2d,
    AdaptiveMaxPool3d,
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    MaxPool1d,
    MaxPool2d,
    MaxPool3d,
)

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "ELU",
    "GELU",
    "Identity",
    "LeakyReLU",
    "Linear",
    "MLP",
    "MSELoss",
    "ReLU",
    "Sigmoid",
    "SiLU",
    "Softmax",
    "Softplus",
    "Tanh",
    # convolution and pooling (issue 8)
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d",
    "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d",
    "AdaptiveMaxPool3d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
]
