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
    # embedding and attention
    "Embedding",
    "MultiheadAttention",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
]
