"""Hugging Face transformers on our rules: GPT-2's Conv1D and the activation modules.

A third-party plugin, shipped in this package as the worked example of one. Its entry
point (``huggingface = "manual_backprop.plugins.huggingface"`` in pyproject.toml) is
loaded the first time a registry is used; `register` adds rules only if ``transformers``
is importable, and nothing here imports it before then, so ``import manual_backprop``
never pulls it in.

Conv1D (GPT-2's c_attn, c_proj, c_fc) is a Linear layer that stores its weight as
in × out, exactly the notes' W(l):

    forward:   z = a W + b                        W: (nx, nf) = (in, out)
    backward:  ∂J/∂a = δ Wᵀ                      the notes' W(l) δ(l+1), row by row
               ∂J/∂W = aᵀ δ = Σₙ aₙ δₙᵀ          the notes' a(l) δ(l+1)ᵀ, summed over the batch
               ∂J/∂b = Σₙ δₙ

The activation modules (GELUActivation, NewGELUActivation, ...) compute GELU by formula
or through torch.nn.functional; each becomes our GELU rule with the same σ.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from manual_backprop import functional as F
from manual_backprop import observe
from manual_backprop._amp import autocast_inputs, without_autocast
from manual_backprop._checks import InputError, shape
from manual_backprop.registry import Registry, supports_real_parameters
from manual_backprop.rules._apply import apply_rule
from manual_backprop.rules.linear import per_sample_linear_grads, per_sample_linear_sq_norms, weight_and_bias_grads

NAME = "huggingface"


class Conv1D(torch.autograd.Function):
    """z = a W + b for a: (*, in), W: (in, out) (the notes' layout), b: (out,) or None."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, W, b):
        z = a @ W
        return z if b is None else z + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, W, b = inputs
        need_a, need_W, _ = ctx.needs_input_grad
        ctx.call = observe.keep(ctx, W, b)
        ctx.save_for_backward(a if need_W or ctx.call else None, W if need_a else None, *observe.output(ctx, output))

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        a, W, *output = ctx.saved_tensors
        need_a, need_W, need_b = ctx.needs_input_grad
        if ctx.call is not None:  # a Linear with W transposed: per-sample gradients transposed likewise
            bias = ctx.params[1] is not None
            ctx.call.see(observe.Seen(
                ctx.call, delta, a, ctx.params,
                per_sample=lambda d, x: _transposed_first(per_sample_linear_grads(d, x, bias)),
                sq_norms=lambda d, x: per_sample_linear_sq_norms(d, x, bias),
                grads=lambda d, x: conv1d_weight_and_bias_grads(d, x, True, bias),
                output=output[0] if output else None,
            ))
        grad_a = delta @ W.T if need_a else None  # δ Wᵀ
        return grad_a, *conv1d_weight_and_bias_grads(delta, a, need_W, need_b)


def _transposed_first(grads):
    """(N, out, in) per-sample ∂J/∂W in Linear's layout -> (N, in, out), Conv1D's; ∂J/∂b unchanged."""
    grad_W, grad_b = grads
    return grad_W.transpose(1, 2), grad_b


def conv1d_weight_and_bias_grads(delta, a, need_W: bool, need_b: bool):
    """∂J/∂W = aᵀ δ (in × out) and ∂J/∂b = Σₙ δₙ: torch.nn.Linear's δᵀ a, transposed."""
    grad_W, grad_b = weight_and_bias_grads(delta, a, need_W, need_b)
    return (grad_W.T if need_W else None), grad_b


def conv1d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """z = a W + b.  Input: (*, nx); weight: (nx, nf); bias: (nf,). Output: (*, nf)."""
    if weight.dim() != 2 or input.dim() == 0 or input.shape[-1] != weight.shape[0]:
        raise InputError(
            f"Conv1D: input (*, nx) and weight (nx, nf) disagree: got input {shape(input)}, weight {shape(weight)}"
        )
    if bias is not None and shape(bias) != (weight.shape[1],):
        raise InputError(f"Conv1D: bias must have shape ({weight.shape[1]},), got {shape(bias)}")
    input, weight, bias = autocast_inputs("addmm", input.device, input, weight, bias)  # torch.addmm in stock
    return apply_rule(Conv1D, input, weight, bias)


# ----------------------------------------------------- counterparts of transformers' classes


def _conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    return conv1d(x, self.weight, self.bias)


def _gelu(self, input: torch.Tensor) -> torch.Tensor:
    return F.gelu(input)  # Φ(z) z, whether torch's gelu or the erf formula computes it in stock


def _gelu_tanh(self, input: torch.Tensor) -> torch.Tensor:
    return F.gelu(input, approximate="tanh")  # ½z(1 + tanh(√(2/π)(z + 0.044715 z³)))


def _silu(self, input: torch.Tensor) -> torch.Tensor:
    return F.silu(input)


# (module of transformers, class name) -> our forward. Missing classes (older or newer
# versions of transformers) are skipped.
FORWARDS: dict[tuple[str, str], Callable] = {
    ("transformers.pytorch_utils", "Conv1D"): _conv1d_forward,
    ("transformers.activations", "GELUActivation"): _gelu,
    ("transformers.activations", "NewGELUActivation"): _gelu_tanh,
    ("transformers.activations", "FastGELUActivation"): _gelu_tanh,
    ("transformers.activations", "GELUTanh"): _gelu_tanh,
    ("transformers.activations", "PytorchGELUTanh"): _gelu_tanh,
    ("transformers.activations", "SiLUActivation"): _silu,
}

_COUNTERPARTS: dict[type, type] = {}  # transformers' class -> ours, made once


def counterpart(stock: type[torch.nn.Module], forward: Callable) -> type[torch.nn.Module]:
    """A subclass of `stock` with the same name, overriding forward only. Made once per class."""
    cls = _COUNTERPARTS.get(stock)
    if cls is None:
        doc = f"{stock.__module__}.{stock.__qualname__} on manual_backprop's rules (forward only)."
        qualname = f"{stock.__name__}Module"  # a module-level name (Conv1D is the rule's), so pickle finds it
        cls = type(stock.__name__, (stock,), {"forward": forward, "__module__": __name__,
                                              "__qualname__": qualname, "__doc__": doc})
        _COUNTERPARTS[stock] = cls
        globals()[qualname] = cls
    return cls


def register(registry: Registry) -> None:
    """Entry-point hook: rules for transformers' classes, only where transformers is importable."""
    if importlib.util.find_spec("transformers") is None:
        return
    for (module_name, class_name), forward in FORWARDS.items():
        try:
            stock = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        registry.register(stock, counterpart(stock, forward), supports=supports_real_parameters)
