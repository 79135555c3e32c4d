"""The native fused MLP rule (csrc/mlp.cpp) against the Python rule (rules/mlp.py) and stock autograd."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import manual_backprop.nn as mnn
from manual_backprop import observe, rules, testing
from manual_backprop._checks import InputError
from manual_backprop.rules import _native
from manual_backprop.rules.mlp import activation as layer_activation
from manual_backprop.rules.mlp import mlp as fused_mlp
from tests.cases import DEVICES, FLOAT32, LOW_PRECISION, node_name
from tests.test_mlp import ACTIVATIONS, ACTIVATION_IDS, pair

SIZES = [3, 5, 4, 2]
# (id, input shape): one batch dimension, several leading dimensions, an empty batch, one sample unbatched
SHAPES = [("batch", (4, 3)), ("leading", (2, 3, 3)), ("batch_0", (0, 3)), ("unbatched", (3,))]
FLOAT64_EXACT = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(autouse=True)
def _native_on(monkeypatch):
    monkeypatch.setattr(_native, "_ENVIRONMENT_ALLOWS", True)  # these tests run both rules, whatever the environment


# The native rule's two CPU paths: "direct" (BLAS and plain loops, float32/float64) and "aten" (ATen ops, as on CUDA)
PATHS = ["direct", "aten"]


@contextlib.contextmanager
def on_path(path: str, device: str):
    """Run the native rule on `path`, and check that it took it: the direct path's forward and backward ran once
    each on CPU for the "direct" path, never otherwise."""
    with _native.direct_path(path == "direct"):
        before = _native.direct_counts()
        yield
        ran = [after - b for after, b in zip(_native.direct_counts(), before)]
    assert ran == ([1, 1] if path == "direct" and device == "cpu" else [0, 0]), f"direct path ran {ran} times"


def step(model, x, upstream, python: bool = False):
    """Output, its node's name and ∂/∂(x, parameters…) of ⟨output, upstream⟩, by the native or the Python rule."""
    x = x.detach().clone().requires_grad_(True)
    params = list(model.parameters())
    if python:
        with _native.python_rule():
            out = model(x)
    else:
        out = model(x)
    grads = torch.autograd.grad(out, [x, *params], upstream, allow_unused=True)
    return out, node_name(out.grad_fn), grads


def test_the_native_rule_is_built_and_loaded():
    """Fails where the native rule silently falls back (no compiler, a broken build): CI must build it."""
    assert _native.load() is not None
    out = mnn.MLP([3, 4, 2])(torch.randn(2, 3))
    assert node_name(out.grad_fn) == "NativeMLPBackward"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape_id, shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("act_id, activation, stock_activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_native_equals_python_rule_equals_stock_float64(act_id, activation, stock_activation, shape_id, shape, bias,
                                                       device, path):
    # the output layer takes the hidden activation too where there is a bias: σ' of the last layer, from a or z
    output = stock_activation() if bias else None
    model, stock = pair(SIZES, activation, stock_activation, output_activation=output, bias=bias,
                        device=device, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64, device=device) * 2
    upstream = torch.randn(*shape[:-1], SIZES[-1], dtype=torch.float64, device=device)
    with on_path(path, device):
        out, name, grads = step(model, x, upstream)
    out_p, name_p, grads_p = step(model, x, upstream, python=True)
    out_s, _, grads_s = step(stock, x, upstream)
    assert (name, name_p) == ("NativeMLPBackward", "MLPBackward")
    assert out.shape == out_s.shape == (*shape[:-1], SIZES[-1])
    torch.testing.assert_close(out, out_p, **FLOAT64_EXACT)
    torch.testing.assert_close(out, out_s, **FLOAT64_EXACT)
    for g, g_p, g_s in zip(grads, grads_p, grads_s, strict=True):
        torch.testing.assert_close(g, g_p, **FLOAT64_EXACT)
        torch.testing.assert_close(g, g_s, **FLOAT64_EXACT)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act_id, activation, stock_activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_native_equals_stock_float32(act_id, activation, stock_activation, device, path):
    model, stock = pair([6, 16, 16, 3], activation, stock_activation, output_activation=stock_activation(),
                        device=device)
    x = torch.randn(2, 5, 6, device=device)
    upstream = torch.randn(2, 5, 3, device=device)
    with on_path(path, device):
        out, name, grads = step(model, x, upstream)
    out_s, _, grads_s = step(stock, x, upstream)
    assert name == "NativeMLPBackward"
    torch.testing.assert_close(out, out_s, **FLOAT32)
    for g, g_s in zip(grads, grads_s, strict=True):
        torch.testing.assert_close(g, g_s, **FLOAT32)


def test_the_direct_path_finds_torchs_blas():
    """Fails where the direct CPU path silently falls back to ATen on a torch that links MKL or OpenBLAS."""
    if not (torch.backends.mkl.is_available() or "BLAS_INFO=open" in torch.__config__.show()):
        pytest.skip("this torch links neither MKL nor OpenBLAS")
    assert _native.has_blas()


@pytest.mark.parametrize("act_id, activation, stock_activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_direct_path_takes_strided_inputs_and_expanded_gradients(act_id, activation, stock_activation):
    """A transposed input, an expanded upstream gradient (as from .sum()) and a non-contiguous weight."""
    model, stock = pair([4, 6, 6, 3], activation, stock_activation, dtype=torch.float64)
    with torch.no_grad():
        for m in (model.layers[1], stock[2]):  # the same values, held transposed
            m.weight = nn.Parameter(m.weight.detach().t().contiguous().t())
    x = torch.randn(4, 7, dtype=torch.float64).t()
    upstream = torch.randn(1, 3, dtype=torch.float64).expand(7, 3)
    with on_path("direct", "cpu"):
        out, _, grads = step(model, x, upstream)
    out_s, _, grads_s = step(stock, x, upstream)
    torch.testing.assert_close(out, out_s, **FLOAT64_EXACT)
    for g, g_s in zip(grads, grads_s, strict=True):
        torch.testing.assert_close(g, g_s, **FLOAT64_EXACT)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rule", [rules.Sigmoid, rules.Tanh])
def test_sigma_prime_rounds_as_torch_in_saturation(rule, path):
    """δ ⊙ σ' on both CPU paths, float32, against float64: sigmoid's (1 − a) is exact, so the error stays a few
    ulp of the result however close a is to 1; tanh's, like torch's 1 − a², a few ulp of δ. One layer,
    W = I, b = 0: ∂J/∂x is δ ⊙ σ'(a) itself."""
    z = torch.linspace(-12, 12, 2001).reshape(-1, 1).requires_grad_(True)
    delta = torch.empty_like(z).uniform_(0.5, 2)
    with on_path(path, "cpu"):
        (got,) = torch.autograd.grad(fused_mlp(z, (layer_activation(rule),), torch.eye(1), torch.zeros(1)), z, delta)
    exact = delta.double() * rule.sigma_prime(rule.sigma(z.detach()).double())
    eps = torch.finfo(torch.float32).eps
    bound = 4 * eps * (exact.abs() if rule is rules.Sigmoid else delta.double().abs())
    assert ((got.double() - exact).abs() <= bound).all()


def test_the_operator_checks_every_shape_before_it_reads_memory():
    """The direct path trusts the shapes, so the operator refuses any mismatch first, naming the layer."""
    op = _native.load()
    kinds, params = _native.encode((layer_activation(rules.Tanh), None))
    x, W0, b0, W1, b1 = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5), torch.randn(2, 5), torch.randn(2)
    cases = [
        (x, [W0, b0, torch.randn(2, 4), b1], r"layer 1 takes 5 features, but its weight has shape \[2, 4\]"),
        (x, [W0, torch.randn(4), W1, b1], r"layer 0's bias must have shape \(5,\), got \[4\]"),
        (torch.randn(4, 2), [W0, b0, W1, b1], r"layer 0 takes 2 features"),
        (x, [W0, b0, None, b1], r"layer 1 has no weight"),
    ]
    for a, weights_and_biases, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(a, weights_and_biases, kinds, params)


def test_mlp_names_a_bad_input_whichever_rule_would_run():
    """MLP.forward hands the native operator the input unchecked; where it refuses, MLP's InputError says why."""
    model = mnn.MLP([3, 4, 2], "tanh")
    for python in (False, True):
        with _native.python_rule() if python else contextlib.nullcontext():
            with pytest.raises(InputError, match=r"sizes\[0\]=3, got input of shape \(2, 5\)"):
                model(torch.randn(2, 5))
            with pytest.raises(InputError, match="dtype"):
                model(torch.randn(2, 3, dtype=torch.float64))


def test_double_backward_takes_the_aten_path_in_backward():
    """create_graph=True needs a differentiable backward: the direct path serves the forward only."""
    model = mnn.MLP([3, 4, 2], "tanh", dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    before = _native.direct_counts()
    (grad_x,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    assert [a - b for a, b in zip(_native.direct_counts(), before)] == [1, 0]
    with _native.python_rule():
        (expected,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    torch.testing.assert_close(grad_x, expected, **FLOAT64_EXACT)
    assert grad_x.grad_fn is not None


# σ' from a (sigmoid, relu6), from z (gelu, softplus), none (identity); and no output activation
GRADGRAD = [("sigmoid", "sigmoid"), ("gelu", None), ("softplus", "softplus"), ("relu6", None), ("identity", None)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation, output_activation", GRADGRAD)
def test_gradcheck_and_gradgradcheck_through_input_and_parameters(activation, output_activation, device):
    model = mnn.MLP([3, 4, 2], activation, output_activation=output_activation, dtype=torch.float64).to(device)
    x = torch.randn(2, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def network(x, *params):
        out = torch.func.functional_call(model, dict(zip(dict(model.named_parameters()), params)), (x,))
        assert node_name(out.grad_fn) == "NativeMLPBackward"  # functional_call is no transform: native runs
        return out

    assert torch.autograd.gradcheck(network, (x, *params))
    assert torch.autograd.gradgradcheck(network, (x, *params))


def test_gradcheck_with_a_bias_on_some_layers_only_and_gradients_for_some_inputs():
    """The rule takes any mix of biases; and only what is asked for gets a gradient (δ stops at the lowest layer)."""
    layers = (layer_activation(rules.Tanh), layer_activation(rules.ELU, 0.7), None)
    W0, W1, W2 = (torch.randn(o, i, dtype=torch.float64) for i, o in [(3, 4), (4, 5), (5, 2)])
    b1 = torch.randn(5, dtype=torch.float64)
    x = torch.randn(3, 3, dtype=torch.float64)

    def network(x, W0, W1, b1, W2):
        return fused_mlp(x, layers, W0, None, W1, b1, W2, None)

    inputs = [t.requires_grad_(True) for t in (x, W0, W1, b1, W2)]
    assert node_name(network(*inputs).grad_fn) == "NativeMLPBackward"
    assert torch.autograd.gradcheck(network, inputs)
    assert torch.autograd.gradgradcheck(network, inputs)
    for wanted in ([2], [3], [1, 4], [0]):  # W1 alone, b1 alone, W0 and W2, the input alone
        args = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
        with _native.python_rule():
            expected = torch.autograd.grad(network(*args).sum(), [args[i] for i in wanted])
        out = network(*args)
        assert node_name(out.grad_fn) == "NativeMLPBackward"
        for g, e in zip(torch.autograd.grad(out.sum(), [args[i] for i in wanted]), expected, strict=True):
            torch.testing.assert_close(g, e, **FLOAT64_EXACT)


def test_environment_variable_forces_the_python_rule(tmp_path):
    """MANUAL_BACKPROP_NATIVE=0, read at import: a process started with it runs the Python rule, and builds nothing."""
    script = ("import torch, manual_backprop.nn as mnn; from tests.cases import node_name; "
              "print(node_name(mnn.MLP([3, 4, 2], 'tanh')(torch.randn(2, 3)).grad_fn))")
    env = {**os.environ, "MANUAL_BACKPROP_NATIVE": "0", "MANUAL_BACKPROP_BUILD_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["MLPBackward"]
    assert not any(tmp_path.iterdir())  # nothing was built


def test_python_rule_block_forces_the_python_rule():
    model = mnn.MLP([3, 4, 2], "tanh")
    x = torch.randn(2, 3)
    assert node_name(model(x).grad_fn) == "NativeMLPBackward"
    with _native.python_rule():
        assert node_name(model(x).grad_fn) == "MLPBackward"
    assert node_name(model(x).grad_fn) == "NativeMLPBackward"


def test_an_activation_without_a_native_form_takes_the_python_rule():
    class Cube(rules.Elementwise):  # a user's own Elementwise rule: the C++ side does not know it
        @staticmethod
        def sigma(z):
            return z**3

        @staticmethod
        def sigma_prime(z):
            return 3 * z * z

    W0, W1 = torch.randn(4, 3, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    out = fused_mlp(torch.randn(2, 3), (layer_activation(Cube), None), W0, None, W1, None)
    assert node_name(out.grad_fn) == "MLPBackward"


def test_while_watched_the_python_rule_reports_every_layer():
    """observe reads δ and a from the Python rule's loop: a watch takes it, and sees each layer's δ and a."""
    model = mnn.MLP([3, 4, 2], "sigmoid")
    x = torch.randn(5, 3)
    seen = []

    class Record:
        keep_output = False

        def see(self, s):
            seen.append((s.name, s.per_sample(s.delta, s.input)[0].sum(0)))

    with observe.watch(model, Record()):
        out = model(x)
        assert node_name(out.grad_fn) == "MLPBackward"
        out.sum().backward()
    assert [name for name, _ in seen] == ["layers.1", "layers.0"]
    for k, (_, per_sample_sum) in zip([1, 0], seen):
        torch.testing.assert_close(per_sample_sum, model.layers[k].weight.grad)
    assert node_name(model(x).grad_fn) == "NativeMLPBackward"  # the watch is over


def test_torch_func_grad_and_vmap_take_the_python_rule_and_agree():
    model = mnn.MLP([3, 5, 2], "silu", dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 3, dtype=torch.float64)

    def loss(params, x):
        return torch.func.functional_call(model, params, (x,)).square().sum()

    grads = torch.func.grad(loss)(params, x)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    out = model(x)
    assert node_name(out.grad_fn) == "NativeMLPBackward"
    expected = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    for name, e in zip(params, expected):
        torch.testing.assert_close(grads[name], e, **FLOAT64_EXACT)
        torch.testing.assert_close(per_sample[name].sum(0), e, **FLOAT64_EXACT)


def test_compile_fullgraph_takes_the_python_rule_and_agrees():
    model = mnn.MLP([3, 5, 2], "tanh", output_activation="sigmoid", dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x).sum(), list(model.parameters()))
    out = model(x)
    assert node_name(out.grad_fn) == "NativeMLPBackward"
    expected = torch.autograd.grad(out.sum(), list(model.parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **FLOAT64_EXACT)


def test_autocast_bfloat16_same_dtypes_as_stock_and_same_values_as_the_python_rule():
    model, stock = pair(SIZES, "relu", nn.ReLU, output_activation=nn.Sigmoid())
    x = torch.randn(6, SIZES[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, name, grads = step(model, x, torch.ones(6, SIZES[-1]))
        out_p, _, grads_p = step(model, x, torch.ones(6, SIZES[-1]), python=True)
        out_s, _, grads_s = step(stock, x, torch.ones(6, SIZES[-1]))
    assert name == "NativeMLPBackward"
    assert out.dtype == out_s.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_p, rtol=0, atol=0)  # the same forward ops
    for g, g_p, g_s in zip(grads, grads_p, grads_s, strict=True):
        assert g.dtype == g_s.dtype  # fp32 parameters get fp32 gradients, as in stock
        # δ ⊙ σ' in bf16 by a different grouping of the same products (native: δa − δa·a)
        torch.testing.assert_close(g, g_p, **LOW_PRECISION[torch.bfloat16])
        torch.testing.assert_close(g, g_s, **LOW_PRECISION[torch.bfloat16])


def saved_bytes(forward) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


@pytest.mark.parametrize("activation", ["sigmoid", "gelu", "identity"])
def test_saves_what_the_python_rule_saves(activation):
    model = mnn.MLP([6, 16, 16, 3], activation)
    x = torch.randn(8, 6)
    native = saved_bytes(lambda: model(x))
    with _native.python_rule():
        python = saved_bytes(lambda: model(x))
    assert native == python > 0


def test_a_training_step_leaves_the_same_state_dict_as_the_python_rule():
    model = mnn.MLP([3, 5, 2], "tanh", dtype=torch.float64)
    twin = mnn.MLP([3, 5, 2], "tanh", dtype=torch.float64)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    for net, python in ((model, False), (twin, True)):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        if python:
            with _native.python_rule():
                nn.functional.mse_loss(net(x), y).backward()
        else:
            nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()
    assert list(model.state_dict()) == list(twin.state_dict()) == [
        "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, twin.state_dict()[key], **FLOAT64_EXACT)


def test_without_a_compiler_one_warning_and_the_python_rule(monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_op", None)
    monkeypatch.setenv("MANUAL_BACKPROP_BUILD_DIR", str(tmp_path))  # nothing built there
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    model = mnn.MLP([3, 4, 2], "tanh")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        out = model(torch.randn(2, 3))
    assert node_name(out.grad_fn) == "MLPBackward"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert node_name(model(torch.randn(2, 3)).grad_fn) == "MLPBackward"


@pytest.mark.parametrize("library", ["recurrent", "norm"])
def test_the_other_native_loops_without_a_compiler_warn_once_and_the_python_rules_run(library, monkeypatch, tmp_path):
    from manual_backprop.rules import _native_norm, _native_recurrent

    module = {"recurrent": _native_recurrent, "norm": _native_norm}[library]
    fresh = _native.Library(module.SOURCE, module.NAME, library, module.LIBRARY.what, module.LIBRARY.flags)
    monkeypatch.setattr(module, "LIBRARY", fresh)
    monkeypatch.setenv("MANUAL_BACKPROP_BUILD_DIR", str(tmp_path))  # nothing built there
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert fresh.build_directory().parent == tmp_path
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    now = (lambda: _native_recurrent.loops_now(x)) if library == "recurrent" else (lambda: _native_norm.rows_now(x))
    with pytest.warns(RuntimeWarning, match=f"native {fresh.what} are unavailable.*no C\\+\\+ compiler"):
        assert now() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert now() is None
    model = {"recurrent": lambda: mnn.LSTM(4, 3, batch_first=True), "norm": lambda: mnn.LayerNorm(4)}[library]()
    out = model.double()(x)
    out = out[0] if isinstance(out, tuple) else out
    assert {"LSTMLayerBackward", "LayerNormBackward"} & set(testing.rule_nodes(out.sum()))  # the Python rule ran


def test_parameters_are_read_as_the_linears_hold_them_parametrized_or_substituted():
    """MLP.forward reads each Linear's parameter dict (fast), or its attribute where parametrized."""

    class Double(nn.Module):
        def forward(self, W):
            return 2 * W

    model = mnn.MLP([3, 4, 2], "tanh", dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    W0 = model.layers[0].weight.detach().clone()
    substitute = {"layers.0.weight": 2 * W0}
    expected = torch.func.functional_call(model, substitute, (x,))
    torch.nn.utils.parametrize.register_parametrization(model.layers[0], "weight", Double())
    out = model(x)
    assert node_name(out.grad_fn) == "NativeMLPBackward"
    torch.testing.assert_close(out, expected, **FLOAT64_EXACT)
    out.sum().backward()
    assert model.layers[0].parametrizations.weight.original.grad is not None
