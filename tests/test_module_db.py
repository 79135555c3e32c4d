"""Every registered rule on torch's own module samples, in train mode with every dropout on, and in eval mode.

torch's `module_db` (torch.testing._internal.common_modules, what torch's own nn tests run) holds, per
module class, the constructor and forward inputs torch tests it with. Each built-in rule whose stock
class has samples there runs them here: once converted, once stock, from the same parameters and the
same RNG seed (so dropout draws the same masks), in float64, in train mode, with every dropout
probability the constructor takes set above zero. Output, input gradients and parameter gradients
must agree to rtol 1e-12. A rule registered later (a new class with a mask) is picked up by default:
`test_every_builtin_rule_has_samples` fails until it has samples here or in torch.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import manual_backprop as mb
from manual_backprop.registry import type_name
from manual_backprop.testing import rule_nodes


def _import_module_db():
    """torch's module samples (needs expecttest, in the dev extra). Importing torch's test utilities
    freezes the backend flags for the whole process (Trainer(deterministic=True) then fails): thaw them."""
    frozen = torch.backends.flags_frozen()
    try:
        from torch.testing._internal import common_modules
    finally:
        if not frozen:
            torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    return common_modules


common_modules = _import_module_db()
FunctionInput, ModuleInput, module_db = common_modules.FunctionInput, common_modules.ModuleInput, common_modules.module_db

EXACT = dict(rtol=1e-12, atol=1e-12)
DROPOUT = 0.3  # what a dropout probability left at 0 (or at its default) is raised to
# Constructor parameters that are a dropout probability, by name (torch's own naming).
DROPOUT_PARAMETERS = ("p", "dropout")


def _dropout_samples(module_info, device, dtype, requires_grad, training, **kwargs):
    """torch's module_db has no Dropout entries: the samples torch's dropout tests use, as ModuleInputs."""
    cls = module_info.module_cls
    shape = {nn.Dropout: (3, 5), nn.Dropout1d: (2, 3, 5), nn.Dropout2d: (2, 3, 4, 5), nn.Dropout3d: (2, 3, 2, 3, 4)}[cls]
    make = lambda s: torch.randn(s, device=device, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    samples = [ModuleInput(FunctionInput(p=p), forward_input=FunctionInput(make(shape))) for p in (0.0, 0.5, 1.0)]
    if cls in (nn.Dropout1d, nn.Dropout3d):  # unbatched (C, *) (torch reads a 3-d Dropout2d input as batched)
        samples.append(ModuleInput(FunctionInput(p=0.4), forward_input=FunctionInput(make(shape[1:]))))
    return samples


class _Info:
    """The part of torch's ModuleInfo these tests read, for classes torch's module_db lacks."""

    def __init__(self, module_cls, module_inputs_func):
        self.module_cls, self.module_inputs_func = module_cls, module_inputs_func
        self.name = module_cls.__name__


EXTRA_INFOS = [_Info(cls, _dropout_samples) for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)]
# Built-in rules with no parameters and no mask, covered by their own test files' tables instead.
WITHOUT_SAMPLES = {nn.Identity: "tests/test_nn.py", nn.Hardsigmoid: "tests/test_activations.py"}


def _builtin_rules():
    return [rule for rule in mb.default_registry() if rule.source == "builtin"]


def _cases():
    stocks = {rule.stock for rule in _builtin_rules()}
    for info in [*module_db, *EXTRA_INFOS]:
        if info.module_cls not in stocks:
            continue
        for training in (True, False):
            samples = info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                              training=training)
            for i, sample in enumerate(samples):
                mode = "train" if training else "eval"
                yield pytest.param(info.module_cls, sample, training, id=f"{info.name}-{mode}-{i}")


def test_every_builtin_rule_has_samples():
    covered = {info.module_cls for info in [*module_db, *EXTRA_INFOS]} | set(WITHOUT_SAMPLES)
    missing = [type_name(rule.stock) for rule in _builtin_rules() if rule.stock not in covered]
    assert not missing, f"rules with no module samples (add them to EXTRA_INFOS): {missing}"


def _with_dropout_on(cls, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The constructor's arguments, with every dropout probability that is 0 (or left out) set to DROPOUT.

    A parameter counts when the first `__init__` along the class's bases that names it does (torch's
    RNN, LSTM and GRU take `*args, **kwargs` and pass them on to RNNBase)."""
    bound = inspect.signature(cls).bind_partial(*args, **kwargs)
    args, kwargs = tuple(bound.args), dict(bound.kwargs)
    for name in DROPOUT_PARAMETERS:
        init = next((base.__init__ for base in cls.__mro__ if "__init__" in vars(base)
                     and name in inspect.signature(base.__init__).parameters), None)
        if init is None or kwargs.get(name):
            continue
        position = list(inspect.signature(init).parameters).index(name) - 1  # after self
        if cls.__init__ is init and position < len(args):  # given positionally
            if not args[position]:
                args = args[:position] + (DROPOUT,) + args[position + 1:]
        else:
            kwargs[name] = DROPOUT
    return args, kwargs


def _run(module, args, kwargs, seed):
    """Forward with `seed`, a loss that weighs every floating output element differently, and its gradients."""
    inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.manual_seed(seed)
    out = module(*args, **kwargs)
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    loss = sum((t * torch.linspace(-1, 2, t.numel(), dtype=t.dtype).view(t.shape)).sum() for t in outputs)
    wrt = inputs + [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None] * len(wrt)
    return outputs, grads, rule_nodes(loss) if isinstance(loss, torch.Tensor) else {}


def _fresh(value):
    """A deep copy of a sample's forward inputs, each tensor a new leaf (the two runs must not share grads)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad and value.is_floating_point())
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a PackedSequence
        return type(value)(*(_fresh(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh(v) for v in value)
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    return copy.deepcopy(value)


@pytest.mark.parametrize("cls, sample, training", list(_cases()))
def test_torch_samples_equal_stock_in_train_mode_with_dropout_on_and_in_eval_mode(cls, sample, training):
    args, kwargs = _with_dropout_on(cls, sample.constructor_input.args, sample.constructor_input.kwargs)
    torch.manual_seed(0)
    stock = cls(*args, **kwargs).to(torch.float64).train(training)
    rule = mb.default_registry().rule_for(cls)
    reason = rule.unsupported_reason(stock)
    ours = mb.convert(stock)
    if reason is not None:  # a configuration the rule declines stays stock, and the report says why
        assert mb.report(ours).rows[0].status == "stock" and mb.report(ours).rows[0].reason == reason
        return
    assert type(ours) is rule.manual
    args, forward_kwargs = sample.forward_input.args, sample.forward_input.kwargs
    seed = 1234
    ref_out, ref_grads, _ = _run(stock, _fresh(args), _fresh(forward_kwargs), seed)
    out, grads, nodes = _run(ours, _fresh(args), _fresh(forward_kwargs), seed)
    assert len(out) == len(ref_out)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, **EXACT, equal_nan=True)
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **EXACT, equal_nan=True)
    computes = training or not isinstance(stock, nn.modules.dropout._DropoutNd)  # eval-mode dropout: the identity
    if computes and any(t.grad_fn is not None for t in ref_out):
        assert nodes, "no backward node of ours in the graph: the gradients came from stock autograd"
