"""The fully connected network of the notes, on our rules or on stock torch layers.

    z(l+1) = W(l) a(l) + b(l),   a(l+1) = σ(z(l+1)),   the last layer linear (σ = identity)

`build_network` is the one place that builds it. Backend "manual" builds
`manual_backprop.nn.MLP`: the whole network as one rule running the notes' backward
loop (measured faster than a Sequential of our per-layer modules at every size
`scripts/bench.py` covers). Backend "autograd" builds the equivalent stock
`nn.Sequential(Linear, σ, Linear, …)`. With the same seed both start from the same weights.

Their state_dict keys differ: the MLP's k-th Linear is `layers.{k}`, the Sequential's
is `{2k}` (activations sit in between). `state_dict_for_backend` renames one layout to
the other, and the tasks apply it when loading a checkpoint, so a checkpoint of either
backend loads into a task of either backend.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

import manual_backprop.nn as mnn
from lightning_modules.errors import ConfigError
from manual_backprop.learning_rules import BACKPROP, learning_rule_names
from manual_backprop.nn.activation import ACTIVATIONS

BACKENDS = ("manual", "autograd")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    return backend


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}")
    return name


def check_sizes(in_features: int, hidden_sizes: Sequence[int], out_features: int) -> list[int]:
    """All layer widths [in, *hidden, out], each a positive int."""
    named = [("in_features", in_features)]
    named += [(f"hidden_sizes[{i}]", h) for i, h in enumerate(hidden_sizes)]
    named += [("out_features", out_features)]
    for name, size in named:
        # bool is an int in Python; a width of True is a config mistake, not 1.
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ConfigError(f"{name} must be a positive integer; got {size!r} (hidden_sizes={list(hidden_sizes)})")
    return [size for _, size in named]


def build_network(
    in_features: int,
    hidden_sizes: Sequence[int],
    out_features: int,
    activation: str = "relu",
    backend: str = "manual",
) -> torch.nn.Module:
    """Linear → σ → ... → Linear with widths [in_features, *hidden_sizes, out_features].

    backend "manual": `manual_backprop.nn.MLP` (one fused rule, every backward ours);
    "autograd": the equivalent stock `torch.nn.Sequential`. The output layer has no
    activation: the loss applies the output nonlinearity (sigmoid / softmax), which is
    what gives δ(L) = ŷ − y.
    """
    sizes = check_sizes(in_features, hidden_sizes, out_features)
    check_activation(activation)
    check_backend(backend)
    network = mnn.MLP(sizes, activation=activation)
    # to_sequential copies the MLP's freshly drawn weights, which are torch.nn.Linear's own
    # initialisation in the same order: one seed, one starting point, whichever the backend.
    return network if backend == "manual" else network.to_sequential()


# The k-th Linear of the built-in network is `layers.{k}` in the MLP and `{2k}` in the Sequential.
_MLP_KEY = re.compile(r"layers\.(\d+)\.(weight|bias)")
_SEQUENTIAL_KEY = re.compile(r"(\d+)\.(weight|bias)")


def _renamed(name: str, backend: str) -> str:
    if backend == "autograd" and (match := _MLP_KEY.fullmatch(name)):
        return f"{2 * int(match[1])}.{match[2]}"
    if backend == "manual" and (match := _SEQUENTIAL_KEY.fullmatch(name)) and int(match[1]) % 2 == 0:
        return f"layers.{int(match[1]) // 2}.{match[2]}"
    return name


def state_dict_for_backend(
    state_dict: Mapping[str, torch.Tensor], backend: str, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """The built-in network's state_dict, saved by either backend, under `backend`'s keys.

    Keys `{prefix}layers.{k}.weight` (manual, MLP) and `{prefix}{2k}.weight` (autograd,
    nn.Sequential) both name the k-th Linear; this renames them to `backend`'s layout
    and leaves every other key (and keys already in that layout) as they are. With
    prefix "net." it works on a task's state_dict or checkpoint["state_dict"]:

        task.load_state_dict(state_dict_for_backend(checkpoint["state_dict"], "autograd", "net."))

    The tasks do this themselves when they load a checkpoint (`load_from_checkpoint`,
    `ckpt_path=`), so `RegressionTask.load_from_checkpoint(path, backend="autograd")`
    loads a manual run's checkpoint.
    """
    check_backend(backend)
    return {
        prefix + _renamed(key.removeprefix(prefix), backend) if key.startswith(prefix) else key: value
        for key, value in state_dict.items()
    }


# ------------------------------------------------------------ a small CNN for images


class SmallCNN(torch.nn.Sequential):
    """[Conv2d(3×3, padding 1) → ReLU → MaxPool2d(2)] per entry of `channels`, then Flatten → Linear.

    Input: (N, in_channels, image_size, image_size), e.g. sklearn's digits as (N, 1, 8, 8)
    (`SklearnDataModule(image_shape=[1, 8, 8])`); output: (N, num_classes) logits. Stock
    torch layers: pass it to a task as `net`, and backend "manual" converts it to our rules
    (conv, ReLU, max-pool and Linear all have one).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = (16, 32),
                 image_size: int = 8) -> None:
        layers: list[torch.nn.Module] = []
        size = image_size
        for c_in, c_out in zip([in_channels, *channels], channels):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
            size //= 2
        if size < 1:
            raise ValueError(f"{len(channels)} max-pools halve image_size={image_size} below 1 pixel")
        layers += [torch.nn.Flatten(), torch.nn.Linear(channels[-1] * size * size, num_classes)]
        super().__init__(*layers)


# ------------------------------------------------------------ a recurrent classifier for sequences


class SequenceClassifier(torch.nn.Module):
    """A recurrent layer over a sequence, read out by a Linear at its last step.

    Input: (N, T, input_size), e.g. sklearn's digits as 8 rows of 8 pixels
    (`SklearnDataModule(image_shape=[8, 8])`); output: (N, num_classes) logits. `cell`: "lstm",
    "gru", "rnn_tanh" or "rnn_relu". Stock torch layers: pass it to a task as `net`, and backend
    "manual" converts it to our rules (the recurrent layer's backward runs through time).
    """

    CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")

    def __init__(self, input_size: int = 8, hidden_size: int = 32, num_classes: int = 10, cell: str = "lstm",
                 num_layers: int = 1, bidirectional: bool = False) -> None:
        super().__init__()
        if cell not in self.CELLS:
            raise ConfigError(f"unknown cell {cell!r}; choose one of: {', '.join(self.CELLS)}")
        kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=True)
        if cell.startswith("rnn_"):
            self.rnn = torch.nn.RNN(input_size, hidden_size, nonlinearity=cell[4:], **kwargs)
        else:
            self.rnn = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(input_size, hidden_size, **kwargs)
        self.head = torch.nn.Linear(hidden_size * (1 + bidirectional), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


# ------------------------------------------------------------ learning rules


def check_learning_rule(learning_rule: str, backend: str) -> str | None:
    """The rule set to convert with (None: backprop); a ConfigError for unknown names or backend "autograd"."""
    choices = learning_rule_names()
    if learning_rule not in choices:
        raise ConfigError(f"unknown learning_rule {learning_rule!r}; choose one of: {', '.join(choices)}")
    if learning_rule == BACKPROP:
        return None
    if backend != "manual":
        raise ConfigError(
            f"learning_rule {learning_rule!r} replaces our rules' backward, so it needs backend 'manual'; "
            f"got backend {backend!r} (stock autograd always runs backprop)"
        )
    return learning_rule
