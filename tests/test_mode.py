"""manual_functions(): torch functions routed to our rules, compared with stock autograd."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manual_backprop as mb
import manual_backprop.functional as MF
from manual_backprop.mode import ROUTES
from manual_backprop.testing import assert_grad_parity, rule_nodes
from tests.cases import DEVICES
from tests.models import DTYPES, ZOO

T = torch.Tensor
x = lambda: torch.randn(4, 3, dtype=torch.float64)  # noqa: E731

# (torch call, the rule node it must produce, inputs maker)
CALLS = [
    ("F.linear", lambda a, w, b: F.linear(a, w, b), "LinearBackward", lambda: (x(), torch.randn(2, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64))),
    ("F.linear-no-bias", lambda a, w: F.linear(a, w), "LinearBackward", lambda: (x(), torch.randn(2, 3, dtype=torch.float64))),
    ("F.sigmoid", F.sigmoid, "SigmoidBackward", lambda: (x(),)),
    ("torch.sigmoid", torch.sigmoid, "SigmoidBackward", lambda: (x(),)),
    ("Tensor.sigmoid", T.sigmoid, "SigmoidBackward", lambda: (x(),)),
    ("torch.special.expit", torch.special.expit, "SigmoidBackward", lambda: (x(),)),
    ("F.tanh", F.tanh, "TanhBackward", lambda: (x(),)),
    ("torch.tanh", torch.tanh, "TanhBackward", lambda: (x(),)),
    ("Tensor.tanh", T.tanh, "TanhBackward", lambda: (x(),)),
    ("F.relu", F.relu, "ReLUBackward", lambda: (x(),)),
    ("torch.relu", torch.relu, "ReLUBackward", lambda: (x(),)),
    ("Tensor.relu", T.relu, "ReLUBackward", lambda: (x(),)),
    ("F.leaky_relu", lambda z: F.leaky_relu(z, 0.3), "LeakyReLUBackward", lambda: (x(),)),
    ("F.elu", lambda z: F.elu(z, alpha=0.5), "ELUBackward", lambda: (x(),)),
    ("F.softplus", lambda z: F.softplus(z, 2.0, 1.0), "SoftplusBackward", lambda: (x(),)),
    ("F.silu", F.silu, "SiLUBackward", lambda: (x(),)),
    ("F.gelu", F.gelu, "GELUBackward", lambda: (x(),)),
    ("F.gelu-tanh", lambda z: F.gelu(z, approximate="tanh"), "GELUBackward", lambda: (x(),)),
    ("F.softmax", lambda z: F.softmax(z, dim=0), "SoftmaxBackward", lambda: (x(),)),
    ("torch.softmax", lambda z: torch.softmax(z, 1), "SoftmaxBackward", lambda: (x(),)),
    ("torch.softmax-dtype", lambda z: torch.softmax(z.float(), 1, torch.float64), "SoftmaxBackward", lambda: (x(),)),
    ("Tensor.softmax", lambda z: z.softmax(-1), "SoftmaxBackward", lambda: (x(),)),
    ("F.mse_loss", lambda a, y: F.mse_loss(a, y, reduction="sum"), "MSELossBackward", lambda: (x(), x())),
    ("F.binary_cross_entropy", lambda a, y: F.binary_cross_entropy(a, y), "BinaryCrossEntropyBackward", lambda: (torch.rand(4, 3, dtype=torch.float64) * 0.9 + 0.05, torch.rand(4, 3, dtype=torch.float64))),
    ("F.binary_cross_entropy_with_logits", F.binary_cross_entropy_with_logits, "BinaryCrossEntropyWithLogitsBackward", lambda: (x(), torch.rand(4, 3, dtype=torch.float64))),
    ("F.cross_entropy", lambda z: F.cross_entropy(z, torch.tensor([0, 2, 1, 2]), label_smoothing=0.2), "CrossEntropyBackward", lambda: (x(),)),
    # norm branch
    ("F.layer_norm", lambda z, w, b: F.layer_norm(z, (3,), w, b), "LayerNormBackward", lambda: (x(), torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))),
    ("torch.layer_norm", lambda z, w, b: torch.layer_norm(z, (3,), w, b, 1e-5, True), "LayerNormBackward", lambda: (x(), torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))),
    ("F.group_norm", lambda z, w: F.group_norm(z, 3, w), "GroupNormBackward", lambda: (x(), torch.randn(3, dtype=torch.float64))),
    ("torch.group_norm", lambda z, w: torch.group_norm(z, 3, w, None, 1e-5, True), "GroupNormBackward", lambda: (x(), torch.randn(3, dtype=torch.float64))),
    ("F.rms_norm", lambda z, w: F.rms_norm(z, [3], w), "RMSNormBackward", lambda: (x(), torch.randn(3, dtype=torch.float64))),
    ("torch.rms_norm", lambda z, w: torch.rms_norm(z, [3], w, 1e-6), "RMSNormBackward", lambda: (x(), torch.randn(3, dtype=torch.float64))),
    ("F.batch_norm", lambda z, w, b: F.batch_norm(z, None, None, w, b, True), "BatchNormBackward", lambda: (x(), torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))),
    ("F.batch_norm-eval", lambda z: F.batch_norm(z, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)), "BatchNormEvalBackward", lambda: (x(),)),
    ("torch.batch_norm", lambda z, w, b: torch.batch_norm(z, w, b, None, None, True, 0.1, 1e-5, True), "BatchNormBackward", lambda: (x(), torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))),
    ("F.relu6", F.relu6, "ReLU6Backward", lambda: (x() * 4,)),
    ("F.hardtanh", lambda z: F.hardtanh(z, -0.5, 0.5), "HardtanhBackward", lambda: (x(),)),
    ("F.hardsigmoid", F.hardsigmoid, "HardsigmoidBackward", lambda: (x() * 4,)),
    ("F.hardswish", F.hardswish, "HardswishBackward", lambda: (x() * 4,)),
    ("F.mish", F.mish, "MishBackward", lambda: (x(),)),
    ("F.prelu", F.prelu, "PReLUBackward", lambda: (x(), torch.rand(3, dtype=torch.float64))),
    ("torch.prelu", torch.prelu, "PReLUBackward", lambda: (x(), torch.rand(1, dtype=torch.float64))),
    ("Tensor.prelu", T.prelu, "PReLUBackward", lambda: (x(), torch.rand(3, dtype=torch.float64))),
]


@pytest.mark.parametrize("name, call, node, make", CALLS, ids=[c[0] for c in CALLS])
def test_each_routed_function_matches_autograd(name, call, node, make):
    inputs = make()
    stock_in = [t.clone().requires_grad_(True) for t in inputs]
    ours_in = [t.clone().requires_grad_(True) for t in inputs]
    stock = call(*stock_in)
    with mb.manual_functions() as mode:
        ours = call(*ours_in)
    assert ours.grad_fn.name() == node and sum(mode.routed.values()) == 1
    torch.testing.assert_close(ours, stock)
    g = torch.randn_like(stock)
    stock.backward(g)
    ours.backward(g)
    for a, b in zip(ours_in, stock_in):
        torch.testing.assert_close(a.grad, b.grad)


def test_routes_have_torch_signatures():
    """Every routed function accepts the keywords of the torch function it replaces."""
    from torch._jit_internal import boolean_dispatched

    for torch_fn, (name, ours) in ROUTES.items():
        try:  # F.max_pool2d & co. dispatch on return_indices: their variant with indices has the signature
            theirs = inspect.signature(boolean_dispatched[torch_fn]["if_true"] if torch_fn in boolean_dispatched else torch_fn)
        except (TypeError, ValueError):
            continue  # C builtins without a Python signature: covered by CALLS
        ours_params = inspect.signature(ours).parameters
        assert set(theirs.parameters) <= set(ours_params), (torch_fn, name)
    assert set(n for n, _ in ROUTES.values()) == set(MF.__all__)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ZOO, ids=repr)
def test_zoo_matches_autograd_through_the_mode(case, dtype):
    model, inputs, target, loss = case.build(dtype)
    result = assert_grad_parity(model, inputs, target, loss, via="manual_functions")
    assert case.mode_nodes <= set(result.rule_nodes), f"rules that did not run: {case.mode_nodes - set(result.rule_nodes)}"
    assert result.routed


@pytest.mark.parametrize("device", DEVICES)
def test_mode_on_device(device):
    case = next(c for c in ZOO if c.name == "nested-heads")
    model, inputs, target, loss = case.build(torch.float32, device)
    assert_grad_parity(model, inputs, target, loss, via="manual_functions")


def test_nothing_is_routed_without_grad():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with mb.manual_functions() as mode:
        with torch.no_grad():
            model(torch.randn(2, 3))
        model.requires_grad_(False)
        out = model(torch.randn(2, 3))
    assert not mode.routed and out.grad_fn is None


def test_complex_inputs_stay_stock():
    z = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    with mb.manual_functions() as mode:
        out = torch.sigmoid(z)
    assert not mode.routed and out.grad_fn.name() == "SigmoidBackward0"


def test_converted_modules_inside_the_mode_run_each_rule_once():
    model = mb.convert(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    x = torch.randn(5, 3, requires_grad=True)
    with mb.manual_functions() as mode:
        out = model(x)
    assert rule_nodes(out) == {"LinearBackward": 2, "TanhBackward": 1}
    assert not mode.routed  # our modules call our functional API directly; the mode saw nothing to route


def test_functions_without_a_rule_run_stock_inside():
    x = torch.randn(2, 4, 8, requires_grad=True)
    with mb.manual_functions() as mode:
        out = F.instance_norm(x)
        attn = F.normalize(x, dim=-1)
    assert not mode.routed
    assert not rule_nodes(out) and not rule_nodes(attn)


def test_attention_and_embedding_functions_are_routed():
    x = torch.randn(2, 4, 8, requires_grad=True)
    E = torch.randn(5, 8, requires_grad=True)
    mha = torch.nn.MultiheadAttention(8, 2)  # stock: its slow path calls F.multi_head_attention_forward
    with mb.manual_functions() as mode:
        attn = F.scaled_dot_product_attention(x, x, x)
        looked_up = F.embedding(torch.tensor([1, 4]), E)
        sparse = F.embedding(torch.tensor([1, 4]), E, sparse=True)  # no rule for sparse gradients: stock
        out, _ = mha(x, x, x)
    assert mode.routed == {"scaled_dot_product_attention": 1, "embedding": 2, "multi_head_attention_forward": 1}
    assert rule_nodes(attn) == {"AttentionBackward": 1} and rule_nodes(looked_up) == {"EmbeddingBackward": 1}
    assert not rule_nodes(sparse)
    assert rule_nodes(out) == {"LinearBackward": 2, "AttentionBackward": 1}


def test_backward_after_the_block_uses_our_rules():
    x = torch.randn(4, 3, requires_grad=True)
    with mb.manual_functions():
        y = torch.tanh(x).sum()
    y.backward()  # outside the mode: the graph already holds TanhBackward
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)


def test_mode_is_not_active_after_the_block():
    with mb.manual_functions():
        pass
    z = torch.randn(3, requires_grad=True)
    assert torch.sigmoid(z).grad_fn.name() == "SigmoidBackward0"
