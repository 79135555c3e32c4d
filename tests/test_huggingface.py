"""The Hugging Face plugin: transformers' Conv1D and activation modules on our rules.

transformers cannot be installed beside this CPU torch, so these tests put a faithful
stand-in (tests/stand_ins/transformers) on sys.path.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import manual_backprop as mb
from manual_backprop.plugins import huggingface as hf
from manual_backprop.registry import Registry
from manual_backprop.testing import rule_nodes
from tests.cases import DEVICES, FLOAT32, assert_parity

STAND_INS = Path(__file__).parent / "stand_ins"


@pytest.fixture
def transformers(monkeypatch):
    """The stand-in transformers package, importable for this test only."""
    len(mb.default_registry())  # the default registry loads its plugins before, never with the stand-in
    monkeypatch.syspath_prepend(str(STAND_INS))
    import transformers.activations
    import transformers.pytorch_utils

    yield transformers
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        del sys.modules[name]


@pytest.fixture
def registry(transformers):
    registry = Registry(builtins=True)
    hf.register(registry)
    return registry


def test_conv1d_rule_is_linear_in_the_notes_layout():
    """z = a W + b; ∂J/∂a = δ Wᵀ, ∂J/∂W = aᵀ δ, ∂J/∂b = Σ δ (W: in × out)."""
    a = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(2, 3, 5, dtype=torch.float64)
    z = hf.conv1d(a, W, b)
    assert z.grad_fn.name() == "Conv1DBackward"
    torch.testing.assert_close(z, a @ W + b)
    grad_a, grad_W, grad_b = torch.autograd.grad(z, [a, W, b], delta)
    rows, a_rows = delta.reshape(-1, 5), a.detach().reshape(-1, 4)
    torch.testing.assert_close(grad_a, delta @ W.detach().T)
    torch.testing.assert_close(grad_W, sum(torch.outer(a_rows[n], rows[n]) for n in range(6)))  # Σₙ aₙ δₙᵀ
    torch.testing.assert_close(grad_b, rows.sum(0))


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4), (0, 4)])
def test_conv1d_gradcheck_and_gradgradcheck(shape):
    inputs = [torch.randn(shape, dtype=torch.float64, requires_grad=True),
              torch.randn(4, 2, dtype=torch.float64, requires_grad=True),
              torch.randn(2, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(hf.conv1d, inputs)
    assert torch.autograd.gradgradcheck(hf.conv1d, inputs)


def test_conv1d_refuses_mismatched_shapes():
    with pytest.raises(mb.InputError, match=r"input \(\*, nx\) and weight \(nx, nf\)"):
        hf.conv1d(torch.randn(3, 4), torch.randn(5, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_conv1d_module_converts_with_stock_gradients(registry, transformers, device):
    torch.manual_seed(0)
    stock = transformers.pytorch_utils.Conv1D(6, 4).to(device)
    ours = mb.convert(stock, registry=registry)
    assert isinstance(ours, transformers.pytorch_utils.Conv1D) and type(ours).__module__ == hf.__name__
    assert repr(ours) == repr(stock) and list(ours.state_dict()) == list(stock.state_dict())
    x = torch.randn(2, 3, 4, device=device)
    assert_parity(ours, stock, [x], "Conv1DBackward", **FLOAT32)
    ours(x).square().sum().backward()
    stock(x).square().sum().backward()
    for p, q in zip(ours.parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **FLOAT32)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False)) is type(ours)  # pickles by reference
    assert type(mb.restore(ours, registry=registry)) is transformers.pytorch_utils.Conv1D


@pytest.mark.parametrize(
    "name,kwargs",
    [("GELUActivation", {}), ("GELUActivation", {"use_gelu_python": True}), ("NewGELUActivation", {}),
     ("FastGELUActivation", {}), ("PytorchGELUTanh", {})],
)
def test_activations_convert_to_our_gelu(registry, transformers, name, kwargs):
    stock = getattr(transformers.activations, name)(**kwargs)
    ours = mb.convert(stock, registry=registry)
    assert mb.report(ours, registry=registry).row("").status == "manual"
    x = torch.randn(4, 5, dtype=torch.float64) * 2
    assert_parity(ours, stock, [x], "GELUBackward", rtol=1e-9, atol=1e-10)


def test_activations_without_a_rule_stay_stock(registry, transformers):
    report = mb.report(mb.convert(transformers.activations.QuickGELUActivation(), registry=registry), registry=registry)
    assert report.row("").status == "stock" and "no rule registered" in report.row("").reason


def test_nothing_registered_without_transformers():
    assert importlib_find("transformers") is None  # transformers is not installed here
    registry = Registry(builtins=True)
    before = len(registry)
    hf.register(registry)
    assert len(registry) == before


def importlib_find(name):
    import importlib.util

    return importlib.util.find_spec(name)


@pytest.mark.slow
def test_entry_point_loads_lazily_and_never_imports_transformers_at_import_time():
    """In a fresh interpreter with the stand-in importable: import manual_backprop leaves transformers
    alone; the default registry's first use loads the entry point, which then registers Conv1D."""
    script = textwrap.dedent(
        """
        import sys
        import manual_backprop as mb
        assert "transformers" not in sys.modules, "imported at our import time"
        from transformers.pytorch_utils import Conv1D
        model = mb.convert(Conv1D(3, 2))
        print(type(model).__module__, mb.report(model).row("").status)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(STAND_INS))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["manual_backprop.plugins.huggingface", "manual"]


def test_pyproject_declares_the_entry_point():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'huggingface = "manual_backprop.plugins.huggingface"' in text


def test_conv1d_runs_under_autocast_like_addmm(registry, transformers):
    stock = transformers.pytorch_utils.Conv1D(3, 4)
    ours = mb.convert(stock, registry=registry)
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(x), stock(x)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert rule_nodes(a) == {"Conv1DBackward": 1}
