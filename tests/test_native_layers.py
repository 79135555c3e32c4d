"""The native per-layer rules (csrc/layers.cpp: Linear, the elementwise activations, MSE, BCE-with-logits and
cross-entropy) against their Python rules and stock autograd, and the cases that must take the Python rules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import manual_backprop.functional as MF
import manual_backprop.nn as mnn
from manual_backprop import observe, rules, testing
from manual_backprop.rules import _native
from tests.cases import FLOAT32

FLOAT64_EXACT = dict(rtol=1e-12, atol=1e-12)
PYTHON_NODE = torch.autograd.function.BackwardCFunction  # every Python rule's node is one; the native ones are not


@pytest.fixture(autouse=True)
def _native_on(monkeypatch):
    monkeypatch.setattr(_native, "_ENVIRONMENT_ALLOWS", True)  # these tests run both rules, whatever the environment
    monkeypatch.setattr(_native, "_LAYERS_ALLOWED", True)  # whatever MANUAL_BACKPROP_NATIVE_LAYERS says here


def _linear(shape, bias):
    def inputs(dtype):
        a = torch.randn(shape, dtype=dtype)
        return [a, torch.randn(4, 3, dtype=dtype), *([torch.randn(4, dtype=dtype)] if bias else [])]

    return inputs


def _elementwise(dtype):
    return [torch.randn(4, 5, dtype=dtype) * 3]


def _regression(dtype):
    return [torch.randn(6, 2, dtype=dtype), torch.randn(6, 2, dtype=dtype)]


def _binary(dtype):
    return [torch.randn(6, 2, dtype=dtype) * 2, torch.rand(6, 2, dtype=dtype)]


def _classes(dtype):  # one sample's target is ignored
    return [torch.randn(5, 4, dtype=dtype) * 2, torch.tensor([0, 3, -100, 1, 3])]


# (id, family, node name, ours, stock, inputs(dtype)): every tensor input that is floating requires grad
CASES = [
    *[(f"linear_{shape_id}_{'bias' if bias else 'no_bias'}", "linear", "LinearBackward", MF.linear, F.linear,
       _linear(shape, bias))
      for shape_id, shape in [("batch", (5, 3)), ("leading", (2, 3, 3)), ("unbatched", (3,)), ("batch_0", (0, 3))]
      for bias in (True, False)],
    *[(name, "activation", node, ours, stock, _elementwise) for name, node, ours, stock in [
        ("sigmoid", "SigmoidBackward", MF.sigmoid, torch.sigmoid),
        ("tanh", "TanhBackward", MF.tanh, torch.tanh),
        ("relu", "ReLUBackward", MF.relu, F.relu),
        ("leaky_relu", "LeakyReLUBackward", lambda z: MF.leaky_relu(z, 0.2), lambda z: F.leaky_relu(z, 0.2)),
        ("elu", "ELUBackward", lambda z: MF.elu(z, 0.7), lambda z: F.elu(z, 0.7)),
        ("softplus", "SoftplusBackward", lambda z: MF.softplus(z, 2.0, 3.0), lambda z: F.softplus(z, 2.0, 3.0)),
        ("silu", "SiLUBackward", MF.silu, F.silu),
        ("gelu", "GELUBackward", MF.gelu, F.gelu),
        ("gelu_tanh", "GELUBackward", lambda z: MF.gelu(z, "tanh"), lambda z: F.gelu(z, approximate="tanh")),
        ("relu6", "ReLU6Backward", MF.relu6, F.relu6),
        ("hardtanh", "HardtanhBackward", lambda z: MF.hardtanh(z, -0.5, 0.8), lambda z: F.hardtanh(z, -0.5, 0.8)),
        ("hardsigmoid", "HardsigmoidBackward", MF.hardsigmoid, F.hardsigmoid),
        ("hardswish", "HardswishBackward", MF.hardswish, F.hardswish),
        ("mish", "MishBackward", MF.mish, F.mish),
    ]],
    *[(f"{name}_{reduction}", "loss", node, lambda *t, f=ours, r=reduction: f(*t, reduction=r),
       lambda *t, f=stock, r=reduction: f(*t, reduction=r), inputs)
      for name, node, ours, stock, inputs in [
          ("mse", "MSELossBackward", MF.mse_loss, F.mse_loss, _regression),
          ("bce_with_logits", "BinaryCrossEntropyWithLogitsBackward", MF.binary_cross_entropy_with_logits,
           F.binary_cross_entropy_with_logits, _binary),
          ("cross_entropy", "CrossEntropyBackward", MF.cross_entropy, F.cross_entropy, _classes),
      ]
      for reduction in ("mean", "sum")],
]
IDS = [case[0] for case in CASES]
# activations whose δ ⊙ σ' has a one-pass loop on the direct path (σ' a polynomial or a step in a); the others
# compute it in ATen ops on either path
DIRECT_ACTIVATIONS = {"sigmoid", "tanh", "relu", "relu6", "hardtanh"}
PATHS = ["direct", "aten"]  # backward on BLAS and plain loops, or on ATen ops (the direct path switched off)


def run(fn, inputs):
    """fn's output, its node, and the gradients of ⟨output, upstream⟩ for every floating input."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    wanted = [t for t in inputs if t.requires_grad]
    torch.manual_seed(1)  # the same upstream for every run
    upstream = torch.randn_like(out)
    return out, out.grad_fn, torch.autograd.grad(out, wanted, upstream)


def ran(family, fn, path):
    """Run fn; return which per-layer native nodes of `family` ran: (forwards, backwards, direct backwards)."""
    before = _native.layer_counts()[family]
    with _native.direct_path(path == "direct"):
        result = fn()
    return result, tuple(after - b for after, b in zip(_native.layer_counts()[family], before))


def test_the_per_layer_rules_are_built_and_named_as_their_python_rules():
    """Fails where the native rules silently fall back (no compiler, a broken build) or lose their node names."""
    assert _native.load() is not None
    z = MF.linear(torch.randn(2, 3), torch.randn(4, 3, requires_grad=True))
    assert type(z.grad_fn).__name__ == z.grad_fn.name() == "LinearBackward" and not isinstance(z.grad_fn, PYTHON_NODE)
    assert z.grad_fn.next_functions and callable(z.grad_fn.register_hook)  # torch's other node methods stay
    assert repr(z.grad_fn).startswith("<torch.autograd.function.LinearBackward object at 0x")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case_id, family, node, ours, stock, inputs", CASES, ids=IDS)
def test_native_equals_python_rule_equals_stock_float64(case_id, family, node, ours, stock, inputs, path):
    torch.manual_seed(0)
    tensors = inputs(torch.float64)
    (out, grad_fn, grads), counts = ran(family, lambda: run(ours, tensors), path)
    direct = path == "direct" and (family != "activation" or case_id in DIRECT_ACTIVATIONS)
    assert counts == (1, 1, int(direct)), f"native {family} node ran {counts} times"
    assert type(grad_fn).__name__ == grad_fn.name() == node and not isinstance(grad_fn, PYTHON_NODE)
    with _native.python_rule():
        out_p, grad_fn_p, grads_p = run(ours, tensors)
    assert type(grad_fn_p).__name__ == node and isinstance(grad_fn_p, PYTHON_NODE)
    out_s, _, grads_s = run(stock, tensors)
    torch.testing.assert_close(out, out_p, **FLOAT64_EXACT)
    torch.testing.assert_close(out, out_s, **FLOAT64_EXACT)
    for g, g_p, g_s in zip(grads, grads_p, grads_s, strict=True):
        torch.testing.assert_close(g, g_p, **FLOAT64_EXACT)
        torch.testing.assert_close(g, g_s, **FLOAT64_EXACT)


@pytest.mark.parametrize("case_id, family, node, ours, stock, inputs", CASES, ids=IDS)
def test_native_equals_stock_float32(case_id, family, node, ours, stock, inputs):
    torch.manual_seed(0)
    tensors = inputs(torch.float32)
    (out, _, grads), counts = ran(family, lambda: run(ours, tensors), "direct")
    assert counts == (1, 1, int(family != "activation" or case_id in DIRECT_ACTIVATIONS))
    out_s, _, grads_s = run(stock, tensors)
    torch.testing.assert_close(out, out_s, **FLOAT32)
    for g, g_s in zip(grads, grads_s, strict=True):
        torch.testing.assert_close(g, g_s, **FLOAT32)


def test_strided_inputs_and_an_expanded_gradient_on_the_direct_path():
    """A transposed input, a weight held transposed and an expanded upstream gradient (as from .sum())."""
    a = torch.randn(3, 7, dtype=torch.float64).t()
    W = torch.randn(3, 4, dtype=torch.float64).t().requires_grad_(True)
    for python in (False, True):
        with _native.python_rule() if python else _native.direct_path(True):
            z = MF.linear(a.requires_grad_(True), W)
            grads = torch.autograd.grad(MF.tanh(z).sum(), [a, W])
        if not python:
            native = grads
    for g, g_p in zip(native, grads, strict=True):
        torch.testing.assert_close(g, g_p, **FLOAT64_EXACT)


# ------------------------------------------------------------------ where the Python rules run instead


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(mnn.Linear(3, 5), mnn.Tanh(), mnn.Linear(5, 2)).to(dtype)


def _python_nodes(out) -> set[str]:
    """Names of the Python rules' nodes in out's graph; the native nodes and stock's are left out."""
    found, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            if isinstance(node, PYTHON_NODE):
                found.add(type(node).__name__)
            stack.extend(n for n, _ in node.next_functions)
    return found


def test_double_backward_runs_the_native_nodes_backward_on_aten_ops_and_agrees():
    """create_graph=True needs a differentiable backward: the nodes' ATen path, never the direct one."""
    model, x = _model(), torch.randn(4, 3, dtype=torch.float64)
    counts = []

    def second_derivatives():
        xg = x.clone().requires_grad_(True)
        loss = MF.mse_loss(model(xg), torch.zeros(4, 2, dtype=torch.float64))
        before = _native.layer_counts()
        (grad_x,) = torch.autograd.grad(loss, xg, create_graph=True)
        counts.append({f: tuple(a - b for a, b in zip(n, before[f])) for f, n in _native.layer_counts().items()})
        return torch.autograd.grad(grad_x.square().sum(), [xg, *model.parameters()])

    native = second_derivatives()
    # every native node's backward ran once, none on the direct path
    assert counts[0] == {"linear": (0, 2, 0), "activation": (0, 1, 0), "loss": (0, 1, 0)}
    with _native.python_rule():
        python = second_derivatives()
    assert counts[1] == {"linear": (0, 0, 0), "activation": (0, 0, 0), "loss": (0, 0, 0)}
    for g, g_p in zip(native, python, strict=True):
        torch.testing.assert_close(g, g_p, **FLOAT64_EXACT)


def test_torch_func_grad_takes_the_python_rules_and_agrees():
    model, x = _model(), torch.randn(4, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(params):
        return MF.mse_loss(torch.func.functional_call(model, params, (x,)), torch.zeros(4, 2, dtype=torch.float64))

    before = _native.layer_counts()
    grads = torch.func.grad(loss)(params)
    assert _native.layer_counts() == before  # no native node ran
    expected = torch.autograd.grad(loss(dict(model.named_parameters())), list(model.parameters()))
    for g, e in zip(grads.values(), expected, strict=True):
        torch.testing.assert_close(g, e, **FLOAT64_EXACT)


def test_a_watch_takes_the_python_rules():
    model, x = _model(), torch.randn(4, 3, dtype=torch.float64)
    seen = []

    class Record:
        keep_output = False

        def see(self, s):
            seen.append(s.name)

    with observe.watch(model, Record()):
        out = model(x)
        assert _python_nodes(out) == {"LinearBackward", "TanhBackward"}
        out.sum().backward()
    assert len(seen) == 2
    assert _python_nodes(model(x)) == set()  # the watch is over: native again


def test_python_rule_block_autocast_bfloat16_and_inplace_take_the_python_rules():
    model, x = _model(torch.float32), torch.randn(4, 3)
    assert _python_nodes(model(x)) == set()
    with _native.python_rule():
        assert _python_nodes(model(x)) == {"LinearBackward", "TanhBackward"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _python_nodes(model(x)) == {"LinearBackward", "TanhBackward"}
    z = MF.linear(x, model[0].weight)
    assert _python_nodes(MF.relu(z, inplace=True)) == {"InplaceElementwiseBackward"}
    assert _python_nodes(model.bfloat16()(x.bfloat16())) == {"LinearBackward", "TanhBackward"}  # float32, 64 only


@pytest.mark.parametrize("environment, python", [({"MANUAL_BACKPROP_NATIVE_LAYERS": "1"}, False),
                                                  ({"MANUAL_BACKPROP_NATIVE_LAYERS": "1", "MANUAL_BACKPROP_NATIVE": "0"},
                                                   True),
                                                  ({"MANUAL_BACKPROP_NATIVE_LAYERS": "0"}, True),
                                                  ({}, False)], ids=["on", "native_off", "layers_off", "default"])
def test_environment_variables_choose_the_rule(environment, python):
    """The native per-layer rules run by default; MANUAL_BACKPROP_NATIVE_LAYERS=0 switches them off, and so does
    MANUAL_BACKPROP_NATIVE=0 (both read at import, so each in a process of its own)."""
    script = ("import torch, manual_backprop.nn as mnn; "
              "z = mnn.Linear(3, 2)(torch.randn(2, 3)); "
              "print(type(z.grad_fn).__name__, isinstance(z.grad_fn, torch.autograd.function.BackwardCFunction))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MANUAL_BACKPROP_NATIVE")}
    done = subprocess.run([sys.executable, "-c", script], env={**env, **environment}, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["LinearBackward", str(python)]


def test_native_layers_block_switches_them_on(monkeypatch):
    monkeypatch.setattr(_native, "_LAYERS_ALLOWED", False)
    model, x = _model(torch.float32), torch.randn(4, 3)
    assert _python_nodes(model(x)) == {"LinearBackward", "TanhBackward"}
    with _native.native_layers():
        assert _python_nodes(model(x)) == set()
    assert _python_nodes(model(x)) == {"LinearBackward", "TanhBackward"}


def test_rule_nodes_counts_the_native_nodes_and_not_stocks():
    x = torch.randn(4, 3)
    model = _model(torch.float32)
    stock = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    y = torch.randint(0, 2, (4,))
    assert testing.rule_nodes(MF.cross_entropy(model(x), y)) == {"LinearBackward": 2, "TanhBackward": 1,
                                                                 "CrossEntropyBackward": 1}
    assert testing.rule_nodes(F.cross_entropy(stock(x), y)) == {}


def test_compile_takes_the_python_rules_and_agrees():
    model, x = _model(), torch.randn(4, 3, dtype=torch.float64)
    y = torch.zeros(4, 2, dtype=torch.float64)
    compiled = torch.compile(lambda x: MF.mse_loss(model(x), y), backend="aot_eager", fullgraph=True)
    before = _native.layer_counts()
    grads = torch.autograd.grad(compiled(x), list(model.parameters()))
    assert _native.layer_counts() == before  # no native node ran, traced or not
    expected = torch.autograd.grad(MF.mse_loss(model(x), y), list(model.parameters()))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, **FLOAT64_EXACT)


@pytest.mark.parametrize("rule, run", [
    (rules.Linear, lambda x: MF.linear(x, torch.ones(2, 3, dtype=x.dtype))),
    (rules.Tanh, MF.tanh),
    (rules.MSELoss, lambda x: MF.mse_loss(x, torch.zeros_like(x))),
    (rules.BinaryCrossEntropyWithLogits, lambda x: MF.binary_cross_entropy_with_logits(x, torch.zeros_like(x))),
    (rules.CrossEntropy, lambda x: MF.cross_entropy(x, torch.zeros(x.shape[0], dtype=torch.int64))),
], ids=lambda v: getattr(v, "__name__", ""))
def test_a_replaced_python_backward_runs_not_the_native_node(rule, run, monkeypatch):
    """A user (or a test) replacing a rule's backward gets that backward: its native twin steps aside."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    run(x).sum().backward()
    assert x.grad.any() and _python_nodes(run(x)) == set()  # as shipped: the native node
    x.grad = None
    monkeypatch.setattr(rule, "backward", staticmethod(lambda ctx, *grads: (torch.zeros_like(x),) + (None,) * 8))
    out = run(x)
    assert _python_nodes(out) == {rule.__name__ + "Backward"}
    out.sum().backward()
    assert not x.grad.any()
