"""The Hugging Face plugin, against the installed transformers: Conv1D, the RMS norms of Llama and T5,
ViT's class token and positions, and the activation modules on our rules.

Whole models (GPT-2, BERT, Llama, T5, ViT, DistilBERT) are in tests/test_real_models.py.
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
from transformers import activations, pytorch_utils
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm
from transformers.models.vit.modeling_vit import ViTConfig, ViTEmbeddings

import manual_backprop as mb
from manual_backprop.plugins import huggingface as hf
from manual_backprop.registry import Registry
from manual_backprop.testing import rule_nodes
from tests.cases import DEVICES, FLOAT32, FLOAT64, assert_parity, tolerance


@pytest.fixture(scope="module")
def registry():
    """Built-in rules and the plugins', this one loaded through its entry point, as users get it."""
    registry = Registry(builtins=True, plugins=True)
    assert registry.rule_for(pytorch_utils.Conv1D) is not None and not registry.plugin_failures
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
def test_conv1d_module_converts_with_stock_gradients(registry, device):
    torch.manual_seed(0)
    stock = pytorch_utils.Conv1D(6, 4).to(device)
    ours = mb.convert(stock, registry=registry)
    assert isinstance(ours, pytorch_utils.Conv1D) and type(ours).__module__ == hf.__name__
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
    assert type(mb.restore(ours, registry=registry)) is pytorch_utils.Conv1D


@pytest.mark.parametrize(
    "name,kwargs",
    [("GELUActivation", {}), ("GELUActivation", {"use_gelu_python": True}), ("NewGELUActivation", {}),
     ("FastGELUActivation", {}), ("PytorchGELUTanh", {})],
)
def test_activations_convert_to_our_gelu(registry, name, kwargs):
    stock = getattr(activations, name)(**kwargs)
    ours = mb.convert(stock, registry=registry)
    assert mb.report(ours, registry=registry).row("").status == "manual"
    x = torch.randn(4, 5, dtype=torch.float64) * 2
    assert_parity(ours, stock, [x], "GELUBackward", rtol=1e-9, atol=1e-10)


def test_activations_without_a_rule_stay_stock(registry):
    report = mb.report(mb.convert(activations.QuickGELUActivation(), registry=registry), registry=registry)
    assert report.row("").status == "stock" and "no rule registered" in report.row("").reason


def test_nothing_registered_without_transformers(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    registry = Registry(builtins=True)
    before = len(registry)
    hf.register(registry)
    assert len(registry) == before


@pytest.mark.slow
def test_entry_point_loads_lazily_and_never_imports_transformers_at_import_time():
    """In a fresh interpreter: import manual_backprop leaves transformers alone; the default registry's
    first use loads the entry point, which then registers Conv1D (and every other class) whole."""
    script = textwrap.dedent(
        """
        import sys, warnings
        import manual_backprop as mb
        assert "transformers" not in sys.modules, "imported at our import time"
        warnings.simplefilter("error", mb.registry.PluginWarning)
        from transformers.pytorch_utils import Conv1D
        model = mb.convert(Conv1D(3, 2))
        print(type(model).__module__, mb.report(model).row("").status, len(mb.default_registry().plugin_failures))
        """
    )
    root = str(Path(__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["manual_backprop.plugins.huggingface", "manual", "0"]


def test_pyproject_declares_the_entry_point():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'huggingface = "manual_backprop.plugins.huggingface"' in text


def test_conv1d_runs_under_autocast_like_addmm(registry):
    stock = pytorch_utils.Conv1D(3, 4)
    ours = mb.convert(stock, registry=registry)
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(x), stock(x)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert rule_nodes(a) == {"Conv1DBackward": 1}


# ------------------------------------------------------------------ LlamaRMSNorm, T5LayerNorm


# Width 16: the mean's 1/16 is exact, and our δ rounds exactly as autograd's does through the float32
# statistic. Width 12: the same formula, other roundings of that float32 term (float32-accurate, as stock).
NORM_CASES = [
    (LlamaRMSNorm, torch.float64, 16, FLOAT64),
    (LlamaRMSNorm, torch.float64, 12, dict(rtol=1e-5, atol=1e-6)),
    (LlamaRMSNorm, torch.float32, 12, FLOAT32),
    (LlamaRMSNorm, torch.bfloat16, 12, tolerance(torch.bfloat16)),
    (T5LayerNorm, torch.float64, 16, FLOAT64),
    (T5LayerNorm, torch.float64, 12, dict(rtol=1e-5, atol=1e-6)),
    (T5LayerNorm, torch.float32, 12, FLOAT32),
    (T5LayerNorm, torch.bfloat16, 12, tolerance(torch.bfloat16)),
]


def _output_and_grads(module, x, upstream):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(upstream)
    return y, x.grad, module.weight.grad


@pytest.mark.parametrize("stock_cls,dtype,width,tol", NORM_CASES,
                         ids=[f"{c.__name__}-{str(d)[6:]}-{w}" for c, d, w, _ in NORM_CASES])
def test_rms_norms_give_stock_values_and_gradients_in_every_dtype(registry, stock_cls, dtype, width, tol):
    """y = γ x̂, x̂ = x/rms; each model's own float32 habit kept: same output dtype, values and gradients."""
    torch.manual_seed(0)
    stock = stock_cls(width, eps=1e-6).to(dtype)
    with torch.no_grad():
        stock.weight.copy_(torch.randn(width) + 1)
    ours = mb.convert(stock, registry=registry)
    x = torch.randn(2, 3, width, dtype=dtype) * 3
    upstream = torch.randn(2, 3, width, dtype=dtype)
    y, grad_x, grad_w = _output_and_grads(ours, x, upstream)
    assert type(y.grad_fn).__name__ == f"{stock_cls.__name__}Backward"
    stock_y, stock_grad_x, stock_grad_w = _output_and_grads(stock, x, upstream)
    assert y.dtype == stock_y.dtype and grad_x.dtype == stock_grad_x.dtype
    torch.testing.assert_close(y, stock_y, **tol)
    torch.testing.assert_close(grad_x, stock_grad_x, **tol)
    torch.testing.assert_close(grad_w, stock_grad_w, **tol)


def test_t5_layer_norm_with_half_precision_weight_casts_like_stock(registry):
    """T5 casts x̂ to γ's dtype when γ is half precision (a float32 input beside a bfloat16 γ)."""
    torch.manual_seed(0)
    stock = T5LayerNorm(8).to(torch.bfloat16)
    ours = mb.convert(stock, registry=registry)
    x, upstream = torch.randn(4, 8), torch.randn(4, 8, dtype=torch.bfloat16)
    (y, grad_x, grad_w), (s_y, s_grad_x, s_grad_w) = (_output_and_grads(m, x, upstream) for m in (ours, stock))
    assert y.dtype == s_y.dtype == torch.bfloat16 and grad_x.dtype == torch.float32
    for a, b in ((y, s_y), (grad_x, s_grad_x), (grad_w, s_grad_w)):
        torch.testing.assert_close(a, b, **tolerance(torch.bfloat16))


@pytest.mark.parametrize("stock_cls", [LlamaRMSNorm, T5LayerNorm])
def test_rms_norms_refuse_a_mismatched_width(registry, stock_cls):
    ours = mb.convert(stock_cls(4), registry=registry)
    with pytest.raises(mb.InputError, match=rf"{stock_cls.__name__}: input \(\*, 4\) expected .* got \(2, 5\)"):
        ours(torch.randn(2, 5))


# ------------------------------------------------------------------ ViT's class token and positions


def _vit_embeddings(**config):
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=6, hidden_dropout_prob=0.0, **config)
    return ViTEmbeddings(config).double()


def test_class_token_and_positions_rule_sums_delta_over_the_batch():
    """z = [c; x] + P; ∂J/∂x = δ[:, 1:], ∂J/∂c = Σₙ δₙ,₀, ∂J/∂P = Σₙ δₙ."""
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, 1, 6, dtype=torch.float64, requires_grad=True)
    P = torch.randn(1, 5, 6, dtype=torch.float64, requires_grad=True)
    z = hf.class_token_and_positions(x, c, P)
    assert z.grad_fn.name() == "ClassTokenAndPositionsBackward"
    torch.testing.assert_close(z, torch.cat([c.expand(3, -1, -1), x], 1) + P)
    delta = torch.randn(3, 5, 6, dtype=torch.float64)
    grad_x, grad_c, grad_P = torch.autograd.grad(z, [x, c, P], delta)
    torch.testing.assert_close(grad_x, delta[:, 1:])
    torch.testing.assert_close(grad_c, delta[:, :1].sum(0, keepdim=True))
    torch.testing.assert_close(grad_P, delta.sum(0, keepdim=True))
    assert torch.autograd.gradcheck(hf.class_token_and_positions, (x, c, P))


def test_class_token_and_positions_refuses_mismatched_shapes():
    with pytest.raises(mb.InputError, match=r"positions \(1, T\+1, D\) disagree: got x \(3, 4, 6\).*positions \(1, 4, 6\)"):
        hf.class_token_and_positions(torch.randn(3, 4, 6), torch.randn(1, 1, 6), torch.randn(1, 4, 6))


def test_vit_embeddings_convert_with_stock_gradients(registry):
    stock = _vit_embeddings()
    ours = mb.convert(stock, registry=registry)
    assert mb.report(ours, registry=registry).row("").status == "manual"
    pixels = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out_ours, out_stock = ours(pixels), stock(pixels)
    torch.testing.assert_close(out_ours, out_stock, **FLOAT64)
    upstream = torch.randn_like(out_stock)
    out_ours.backward(upstream)
    out_stock.backward(upstream)
    for (name, p), q in zip(ours.named_parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **FLOAT64, msg=name)
    with pytest.raises(mb.InputError, match="interpolate_pos_encoding=True has no rule"):
        ours(pixels, interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match=r"Input image size \(4\*4\) doesn't match model \(8\*8\)"):
        ours(torch.randn(2, 3, 4, 4, dtype=torch.float64))


def test_vit_embeddings_with_a_mask_token_stay_stock_with_the_reason(registry):
    report = mb.report(mb.convert(_vit_embeddings(), registry=registry), registry=registry)
    assert report.row("").status == "manual"
    stock = _vit_embeddings()
    stock.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 6, dtype=torch.float64))  # use_mask_token=True
    row = mb.report(mb.convert(stock, registry=registry), registry=registry).row("")
    assert row.status == "stock" and "mask_token" in row.reason


@pytest.mark.parametrize("stock_cls", [LlamaRMSNorm, T5LayerNorm])
def test_rms_norms_second_derivatives_equal_stock(registry, stock_cls):
    """Double backward sees 1/rms as a function of x (recomputed), as stock autograd does."""
    torch.manual_seed(0)
    stock = stock_cls(16)
    with torch.no_grad():
        stock.weight.copy_(torch.randn(16) + 1)
    ours = mb.convert(stock, registry=registry)
    x, upstream = torch.randn(3, 16), torch.randn(3, 16)
    second = []
    for module in (ours, stock):
        a = x.clone().requires_grad_(True)
        (grad_a,) = torch.autograd.grad(module(a), a, upstream, create_graph=True)
        second.append(torch.autograd.grad(grad_a.square().sum(), [a, module.weight]))
    for a, b in zip(*second):
        torch.testing.assert_close(a, b, **FLOAT32)
