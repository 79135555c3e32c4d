"""`torch.nn.functional`, with every gradient from our rules.

Same names, signatures and defaults as torch.nn.functional. Each function checks
its inputs (metadata only on the hot path; see `_checks`), casts them as autocast
would cast the stock op's (see `_amp`), and calls its rule in `manual_backprop.rules`.

One module per family, named as in `manual_backprop.rules` (activations, linear, losses,
norm, dropout, conv, pooling, embedding, attention, recurrent); every function is
imported here, so `manual_backprop.functional.<name>` is the way in. Where a function
shares its family's name (`linear`, `dropout`, `embedding`) the attribute is the function,
as in torch.nn.functional; `from manual_backprop.functional.dropout import ...` reaches
the module.
"""

from manual_backprop.functional.activations import (
    elu,
    gelu,
    hardsigmoid,
    hardswish,
    hardtanh,
    identity,
    leaky_relu,
    mish,
    prelu,
    relu,
    relu6,
    sigmoid,
    silu,
    softmax,
    softplus,
    tanh,
)
from manual_backprop.functional.attention import (
    attention_with_weights,
    multi_head_attention_forward,
    scaled_dot_product_attention,
)
from manual_backprop.functional.conv import (
    conv1d,
    conv2d,
    conv3d,
    conv_transpose1d,
    conv_transpose2d,
    conv_transpose3d,
    pad,
)
from manual_backprop.functional.dropout import dropout, dropout1d, dropout2d, dropout3d
from manual_backprop.functional.embedding import embedding
from manual_backprop.functional.linear import linear
from manual_backprop.functional.losses import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    mse_loss,
)
from manual_backprop.functional.norm import batch_norm, group_norm, layer_norm, rms_norm
from manual_backprop.functional.pooling import (
    adaptive_avg_pool1d,
    adaptive_avg_pool2d,
    adaptive_avg_pool3d,
    adaptive_max_pool1d,
    adaptive_max_pool2d,
    adaptive_max_pool3d,
    avg_pool1d,
    avg_pool2d,
    avg_pool3d,
    max_pool1d,
    max_pool2d,
    max_pool3d,
)
from manual_backprop.functional.recurrent import (
    gru,
    gru_cell,
    lstm,
    lstm_cell,
    rnn_relu,
    rnn_relu_cell,
    rnn_tanh,
    rnn_tanh_cell,
)

# torch.nn.functional's names (`identity` and `attention_with_weights` are ours alone, so left out:
# manual_functions() routes exactly these, and a test holds the two lists equal)
__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "elu",
    "gelu",
    "leaky_relu",
    "linear",
    "mse_loss",
    "relu",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "tanh",
    # normalisation, dropout, the activations CNNs use
    "batch_norm",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "relu6",
    "hardtanh",
    "hardsigmoid",
    "hardswish",
    "mish",
    "prelu",
    # embedding and attention
    "embedding",
    "multi_head_attention_forward",
    "scaled_dot_product_attention",
    # recurrent
    "gru",
    "gru_cell",
    "lstm",
    "lstm_cell",
    "rnn_relu",
    "rnn_relu_cell",
    "rnn_tanh",
    "rnn_tanh_cell",
    # convolution and pooling
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "pad",
]
