"""The rules: `torch.autograd.Function`s whose backward is the notes' algebra.

Notation (shared/seed, "Matrix algebra and Backpropagation"), mapped once to torch:

    notes                      code                         shape here
    a(l)   activation          a                            (*, in)
    z(l+1) pre-activation      z = a Wᵀ + b                 (*, out)
    W(l)   weights, in × out   W = weight, torch's (out × in) = W(l)ᵀ
    δ(l)   ∂J/∂z(l)            delta                        like z
    σ'     activation slope    sigma_prime                  like z

So the notes' z = W(l)ᵀ a becomes `a @ W.T`, their δ(l) = W(l) δ(l+1) becomes
`delta @ W`, and their ∂J/∂W(l) = a(l) δ(l+1)ᵀ (in × out) becomes torch's
`delta.T @ a` (out × in): the same outer products, in torch's layout. Everything
in this package uses torch's layout.
"""

from manual_backprop.rules.activations import (
    ELU,
    GELU,
    Elementwise,
    Identity,
    LeakyReLU,
    ReLU,
    Sigmoid,
    SiLU,
    Softmax,
    Softplus,
    Tanh,
)
from manual_backprop.rules.linear import Linear
from manual_backprop.rules.mlp import MLP
# norm branch: normalisation, dropout, the activations CNNs use
from manual_backprop.rules.activations import Hardsigmoid, Hardswish, Hardtanh, Mish, PReLU, ReLU6
from manual_backprop.rules.dropout import Dropout
from manual_backprop.rules.norm import BatchNorm, BatchNormEval, GroupNorm, LayerNorm, RMSNorm
from manual_backprop.rules.embedding import Embedding
from manual_backprop.rules.attention import Attention
from manual_backprop.rules.recurrent import GRULayer, LSTMLayer, RNNLayer
from manual_backprop.rules.losses import (
    BinaryCrossEntropy,
    BinaryCrossEntropyWithLogits,
    CrossEntropy,
    MSELoss,
)

# convolution and pooling
from manual_backprop.rules.conv import Convolution, ConvTranspose, Pad
from manual_backprop.rules.pooling import AdaptiveAvgPool, AdaptiveMaxPool, AvgPool, MaxPool

__all__ = [
    "ELU",
    "GELU",
    "BinaryCrossEntropy",
    "BinaryCrossEntropyWithLogits",
    "CrossEntropy",
    "Elementwise",
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
    "BatchNorm",
    "BatchNormEval",
    "Dropout",
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
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
    "AvgPool",
    "Convolution",
    "ConvTranspose",
    "MaxPool",
    "Pad",
    # embedding and attention
    "Attention",
    "Embedding",
    # recurrent
    "GRULayer",
    "LSTMLayer",
    "RNNLayer",
]
