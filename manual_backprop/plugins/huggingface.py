"""Hugging Face transformers on our rules: GPT-2's Conv1D, the RMS norms of Llama and T5, ViT's
class token and position embeddings, and the activation modules.

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

LlamaRMSNorm and T5LayerNorm are RMSNorm (x̂ = x/rms, rms = √(mean(x²) + eps), y = γ x̂; δ as
in rules/norm.py), each with its own dtype habit, which the rules below keep so that a
converted model computes what the stock one does in every dtype: Llama normalises in
float32 whatever the model's dtype and casts x̂ back; T5 computes only the statistic
1/rms in float32. In a float64 model both are therefore float32-accurate, stock and ours.

ViTEmbeddings puts a learned class token before the patch embeddings and adds learned
positions, z = [c; x] + P; its rule sums δ over the batch for c and P.

Everything else these models do (rotary position embeddings, relative position bias
added to the scores, grouped-query attention's head repeat) is tensor arithmetic in their
attention's forward without parameters of its own: it runs on autograd, beside our Linear,
Embedding and attention rules (`manual_functions()` routes the attention itself).
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
from manual_backprop.rules.norm import norm_seen, normalize, per_sample_affine_grads
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


# ------------------------------------------------------------ RMS norms of Llama and T5


class _RMSNormRule(torch.autograd.Function):
    """What the two RMS norm rules share: forward returns (y, 1/rms); backward gets x, γ and 1/rms."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, ctx.eps = inputs
        ctx.call = observe.keep(ctx, weight)
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, weight, output[1], *observe.output(ctx, output[0]))


class LlamaRMSNorm(_RMSNormRule):
    """y = γ · cast(x̂), x̂ = x/rms normalised in float32 over the last dim, cast back to x's dtype.

        ∂J/∂x = cast(`delta_through_rms`(g, x, 1/rms)),  g = float32(δ γ), x in float32
        ∂J/∂γ = Σ_* δ · cast(x̂)
    """

    @staticmethod
    def forward(x, weight, eps):
        x_hat, _, rstd = normalize(x.float(), [-1], eps, centered=False)
        return weight * x_hat.to(x.dtype), rstd

    @staticmethod
    @without_autocast
    def backward(ctx, delta, _rstd):
        x, weight, rstd, *output = ctx.saved_tensors
        need_x, need_gamma, _ = ctx.needs_input_grad
        if ctx.call is not None:
            x_hat_of = lambda a: normalize(a.float(), [-1], ctx.eps, centered=False)[0].to(a.dtype)  # noqa: E731
            ctx.call.see(norm_seen(ctx.call, delta, x, ctx.params, _per_sample_gamma(x_hat_of, weight), *output))
        (need_gamma,) = observe.needs(ctx, need_gamma)  # book-keeping DP-SGD forms it clipped
        if torch.is_grad_enabled():  # double backward: 1/rms as a function of x
            rstd = normalize(x.float(), [-1], ctx.eps, centered=False)[2]
        grad_x = delta_through_rms((delta * weight).float(), x.float(), rstd).to(x.dtype) if need_x else None
        grad_gamma = _sum_to(delta * (x.float() * rstd).to(x.dtype), weight) if need_gamma else None
        return grad_x, grad_gamma, None


class T5LayerNorm(_RMSNormRule):
    """y = γ x̂, x̂ = x · (1/rms) with only the statistic 1/rms computed in float32 (x̂ in x's dtype, or
    float32 beside a half-precision x; cast to γ's dtype when γ is half precision).

        ∂J/∂x = `delta_through_rms`(g, x, 1/rms),  g = δ γ   (its second term, through the statistic, in float32)
        ∂J/∂γ = Σ_* δ · x̂
    """

    @staticmethod
    def forward(x, weight, eps):
        rstd = _t5_rstd(x, eps)
        return weight * _t5_x_hat(x, weight, rstd), rstd

    @staticmethod
    @without_autocast
    def backward(ctx, delta, _rstd):
        x, weight, rstd, *output = ctx.saved_tensors
        need_x, need_gamma, _ = ctx.needs_input_grad
        if ctx.call is not None:
            x_hat_of = lambda a: _t5_x_hat(a, weight, _t5_rstd(a, ctx.eps))  # noqa: E731
            ctx.call.see(norm_seen(ctx.call, delta, x, ctx.params, _per_sample_gamma(x_hat_of, weight), *output))
        (need_gamma,) = observe.needs(ctx, need_gamma)  # book-keeping DP-SGD forms it clipped
        if torch.is_grad_enabled():  # double backward: 1/rms as a function of x
            rstd = _t5_rstd(x, ctx.eps)
        grad_x = delta_through_rms(delta * weight, x, rstd).to(x.dtype) if need_x else None
        grad_gamma = _sum_to(delta * _t5_x_hat(x, weight, rstd), weight) if need_gamma else None
        return grad_x, grad_gamma, None


def delta_through_rms(g, x, rstd):
    """The notes' δ through x̂ = x·(1/rms), written in x: ∂J/∂x = (1/rms)(g − x̂·mean(g·x̂)) over the last dim

        = g·(1/rms) − x·(mean(g·x)·(1/rms)³)

    The second term is the part that flows through the statistic 1/rms; it is computed in the statistic's
    dtype (float32 in both models), in the order autograd takes through rsqrt and mean, so that a
    float64 model gives the stock model's float32 rounding, not a different one.
    """
    through_rms = (g * x).mean(-1, keepdim=True).to(rstd.dtype) * rstd.pow(3)
    return g * rstd - x.to(rstd.dtype) * through_rms


def _t5_rstd(x, eps):
    """1/rms = 1/√(mean(x²) + eps) over the last dim, in float32 (T5LayerNorm's variance)."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def _t5_x_hat(x, weight, rstd):
    """x̂ = x·(1/rms) as T5LayerNorm computes it: in x's dtype promoted with float32's, then γ's if half."""
    x_hat = x * rstd
    return x_hat.to(weight.dtype) if weight.dtype in (torch.float16, torch.bfloat16) else x_hat


def _sum_to(grad, weight):
    """∂J/∂γ: a per-feature product summed over every leading dim, in γ's dtype."""
    return grad.reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)


def _per_sample_gamma(x_hat_of, weight):
    """`Seen.per_sample` of an RMS norm: sample n's ∂J/∂γ = Σ_t δₙₜ x̂ₙₜ, x̂ from the sample's own a."""
    def per_sample(delta, a):
        return per_sample_affine_grads(delta, x_hat_of(a), [delta.dim() - 1], weight, None)[:1]

    return per_sample


def _rms_norm_checks(op: str, x, weight) -> None:
    if x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise InputError(f"{op}: input (*, {weight.shape[0]}) expected for weight {shape(weight)}, got {shape(x)}")


# ------------------------------------------------------ ViT's class token and positions


class ClassTokenAndPositions(torch.autograd.Function):
    """z = [c; x] + P: the class token c (1, 1, D) before the patches x (N, T, D), positions P (1, T+1, D) added.

        ∂J/∂x = δ[:, 1:],   ∂J/∂c = Σₙ δₙ,₀,   ∂J/∂P = Σₙ δₙ
    """

    @staticmethod
    def forward(x, c, P):
        return torch.cat([c.expand(x.shape[0], -1, -1), x], dim=1) + P

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, c, P = inputs
        ctx.call = observe.keep(ctx, c, P)
        ctx.save_for_backward(x if ctx.call else None, *observe.output(ctx, output))

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        need_x, need_c, need_P = ctx.needs_input_grad
        if ctx.call is not None:
            x, *output = ctx.saved_tensors
            ctx.call.see(observe.Seen(ctx.call, delta, x, ctx.params, per_sample=_class_and_positions_per_sample,
                                      sq_norms=_class_and_positions_sq_norms, output=output[0] if output else None))
        grad_x = delta[:, 1:] if need_x else None
        grad_c = delta[:, :1].sum(0, keepdim=True) if need_c else None
        grad_P = delta.sum(0, keepdim=True) if need_P else None
        return grad_x, grad_c, grad_P


def _class_and_positions_per_sample(delta, a):
    """Sample n's ∂J/∂c = δₙ,₀ and ∂J/∂P = δₙ: (N, 1, 1, D) and (N, 1, T+1, D)."""
    return delta[:, None, :1], delta[:, None]


def _class_and_positions_sq_norms(delta, a):
    return delta[:, 0].square().sum(-1) + delta.flatten(1).square().sum(1)


def class_token_and_positions(x: torch.Tensor, cls_token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[c; x] + P.  x: (N, T, D); cls_token: (1, 1, D); positions: (1, T+1, D). Output: (N, T+1, D)."""
    if x.dim() != 3 or shape(cls_token) != (1, 1, x.shape[-1]) or shape(positions) != (1, x.shape[1] + 1, x.shape[2]):
        raise InputError(f"ViT embeddings: x (N, T, D), class token (1, 1, D) and positions (1, T+1, D) disagree: "
                         f"got x {shape(x)}, class token {shape(cls_token)}, positions {shape(positions)}")
    return apply_rule(ClassTokenAndPositions, x, cls_token, positions)


# ----------------------------------------------------- counterparts of transformers' classes


def _conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    return conv1d(x, self.weight, self.bias)


def _gelu(self, input: torch.Tensor) -> torch.Tensor:
    return F.gelu(input)  # Φ(z) z, whether torch's gelu or the erf formula computes it in stock


def _gelu_tanh(self, input: torch.Tensor) -> torch.Tensor:
    return F.gelu(input, approximate="tanh")  # ½z(1 + tanh(√(2/π)(z + 0.044715 z³)))


def _silu(self, input: torch.Tensor) -> torch.Tensor:
    return F.silu(input)


def _llama_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    _rms_norm_checks("LlamaRMSNorm", hidden_states, self.weight)
    return apply_rule(LlamaRMSNorm, hidden_states, self.weight, self.variance_epsilon)[0]


def _t5_layer_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    _rms_norm_checks("T5LayerNorm", hidden_states, self.weight)
    return apply_rule(T5LayerNorm, hidden_states, self.weight, self.variance_epsilon)[0]


def _vit_embeddings(self, pixel_values: torch.Tensor, bool_masked_pos=None, interpolate_pos_encoding: bool = False):
    if interpolate_pos_encoding:  # torch's bicubic interpolation of P would carry P's gradient on autograd
        raise InputError("ViTEmbeddings on manual rules: interpolate_pos_encoding=True has no rule; convert with "
                         "exclude=['*embeddings'] to keep this module stock")
    height, width = pixel_values.shape[-2:]
    if (height, width) != tuple(self.image_size):
        raise ValueError(f"Input image size ({height}*{width}) doesn't match model ({self.image_size[0]}*{self.image_size[1]}).")
    x = self.patch_embeddings(pixel_values)
    return self.dropout(class_token_and_positions(x, self.cls_token, self.position_embeddings))


def _supports_vit_embeddings(module: torch.nn.Module) -> str | None:
    if module.mask_token is not None:
        return "mask_token (use_mask_token=True) is blended into the patches by stock arithmetic"
    return supports_real_parameters(module)


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
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"): _llama_rms_norm,
    ("transformers.models.t5.modeling_t5", "T5LayerNorm"): _t5_layer_norm,
    ("transformers.models.vit.modeling_vit", "ViTEmbeddings"): _vit_embeddings,
}
# Configurations a rule does not cover (the module then stays stock, with this reason in the report).
SUPPORTS: dict[tuple[str, str], Callable] = {
    ("transformers.models.vit.modeling_vit", "ViTEmbeddings"): _supports_vit_embeddings,
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
        supports = SUPPORTS.get((module_name, class_name), supports_real_parameters)
        registry.register(stock, counterpart(stock, forward), supports=supports)
