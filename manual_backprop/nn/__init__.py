"""Drop-in `torch.nn` modules on our rules.

Each subclasses its torch.nn counterpart and overrides `forward` only: same
constructor, parameters, state_dict keys and repr, and `isinstance(m, torch.nn.X)`
still holds. The math lives in `manual_backprop.functional` / `manual_backprop.rules`.
"""

from manual_backprop.nn.activation import ELU, GELU, LeakyReLU, ReLU, Sigmoid, SiLU, Softmax, Softplus, Tanh
from manual_backprop.nn.linear import Identity, Linear
from manual_backprop.nn.loss import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from manual_backprop.nn.mlp import MLP
from manual_backprop.nn.embedding import Embedding
from manual_backprop.nn.attention import MultiheadAttention, TransformerDecoderLayer, TransformerEncoderLayer
from manual_backprop.nn.recurrent import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

# norm branch: normalisation, dropout, the activations CNNs use
from manual_backprop.nn.activation import Hardsigmoid, Hardswish, Hardtanh, Mish, PReLU, ReLU6
from manual_backprop.nn.dropout import Dropout, Dropout1d, Dropout2d, Dropout3d
from manual_backprop.nn.norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, LayerNorm, RMSNorm
# convolution and pooling
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
    # norm branch
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "GroupNorm",
    "Hardsigmoid",
    "Hardswish",
    "Hardtanh",
    "LayerNorm",
    "Mish",
    "PReLU",
    "RMSNorm",
    "ReLU6",
    # convolution and pooling
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
    # embedding and attention
    "Embedding",
    "MultiheadAttention",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    # recurrent
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "RNN",
    "RNNCell",
]
