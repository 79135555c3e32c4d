"""manual_backprop.functional: one module per family, as in rules/, behind one public namespace."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import types
from pathlib import Path

import pytest

import manual_backprop.functional as MF
import manual_backprop.rules

# family module -> the public functions it holds: every name the package has offered stays importable from it
FAMILIES = {
    "activations": ["elu", "gelu", "hardsigmoid", "hardswish", "hardtanh", "identity", "leaky_relu", "mish", "prelu",
                    "relu", "relu6", "sigmoid", "silu", "softmax", "softplus", "tanh"],
    "attention": ["attention_with_weights", "multi_head_attention_forward", "scaled_dot_product_attention"],
    "conv": ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "pad"],
    "dropout": ["dropout", "dropout1d", "dropout2d", "dropout3d"],
    "embedding": ["embedding"],
    "linear": ["linear"],
    "losses": ["binary_cross_entropy", "binary_cross_entropy_with_logits", "cross_entropy", "mse_loss"],
    "norm": ["batch_norm", "group_norm", "layer_norm", "rms_norm"],
    "pooling": ["adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
                "adaptive_max_pool2d", "adaptive_max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d",
                "max_pool2d", "max_pool3d"],
    "recurrent": ["gru", "gru_cell", "lstm", "lstm_cell", "rnn_relu", "rnn_relu_cell", "rnn_tanh", "rnn_tanh_cell"],
}
OURS_ALONE = {"identity", "attention_with_weights"}  # not torch.nn.functional names, so not in __all__
NAMES = [(family, name) for family, names in FAMILIES.items() for name in names]


@pytest.mark.parametrize("family, name", NAMES, ids=[name for _, name in NAMES])
def test_each_public_name_is_the_function_its_family_module_defines(family, name):
    module = sys.modules[f"manual_backprop.functional.{family}"]
    fn = getattr(MF, name)
    # a function, not the module of the same name (linear, dropout, embedding share their family's name)
    assert isinstance(fn, types.FunctionType), (name, fn)
    assert fn is getattr(module, name) and fn.__module__ == module.__name__
    namespace = {}
    exec(f"from manual_backprop.functional import {name}", namespace)
    assert namespace[name] is fn


def test_all_lists_the_torch_names():
    assert sorted(MF.__all__) == sorted(name for _, name in NAMES if name not in OURS_ALONE)
    assert len(MF.__all__) == len(set(MF.__all__))


def test_families_mirror_rules_and_every_public_function_is_exported():
    path = Path(MF.__file__).parent
    families = {m.name for m in pkgutil.iter_modules([str(path)]) if not m.name.startswith("_")}
    assert families == set(FAMILIES)
    rule_modules = {m.name for m in pkgutil.iter_modules(manual_backprop.rules.__path__)}
    assert families <= rule_modules, families - rule_modules
    for family in families:
        module = importlib.import_module(f"manual_backprop.functional.{family}")
        defined = {name for name, fn in inspect.getmembers(module, inspect.isfunction)
                   if not name.startswith("_") and fn.__module__ == module.__name__}
        assert defined == set(FAMILIES[family]), (family, defined ^ set(FAMILIES[family]))
