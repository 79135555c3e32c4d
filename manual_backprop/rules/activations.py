"""Activations: a(l+1) = σ(z(l+1)), and backward δ(l) = δ ⊙ σ'(z).

Every elementwise activation supplies σ and σ' (and, where it measurably pays, a
faster form of δ ⊙ σ'); the one shared piece, `Elementwise`, saves what σ' needs
and applies δ ⊙ σ'. Where the math allows,
σ' is computed from the saved output a (σ' = a(1−a), tanh' = 1−a², relu' = [a>0]),
so nothing but a is kept for backward, as in torch. Softmax, not elementwise,
writes out its Jacobian-vector product.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from manual_backprop import observe
from manual_backprop._amp import without_autocast
from manual_backprop.rules._apply import direct_backward


def _delta_times(sigma_prime, delta, saved, *params):
    """The default δ ⊙ σ': form σ', then multiply."""
    return delta * sigma_prime(saved, *params)


class Elementwise(torch.autograd.Function):
    """a = σ(z, *params);  backward: δ ⊙ σ'(·), from a or from z.

    Subclasses define `sigma(z, *params)`, `sigma_prime(saved, *params)` and
    `sigma_prime_from`: "a" (σ' from the output), "z" (from the input) or None
    (σ' is constant; nothing is saved). They may also define `delta_sigma_prime(delta,
    saved, *params)`, the product δ ⊙ σ' with fewer new tensors than forming σ' and
    multiplying (backward is memory-bound at large sizes, so each pass and allocation
    saved per layer shows in `scripts/bench.py`); by default it is
    `delta * sigma_prime(saved, *params)`. Either way σ' stays written out once, readable.
    """

    generate_vmap_rule = True
    sigma_prime_from: str | None = "z"

    @staticmethod
    def sigma(z, *params):
        raise NotImplementedError

    @staticmethod
    def sigma_prime(saved, *params):
        raise NotImplementedError

    delta_sigma_prime = None  # optional fused δ ⊙ σ'

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # autograd.Function wants static forward/backward; bind this subclass's σ, σ' into them.
        sigma, sigma_prime, source = cls.sigma, cls.sigma_prime, cls.sigma_prime_from
        if cls.delta_sigma_prime is None:  # the default δ ⊙ σ', named as the class's own so it pickles
            # (a plain function, not functools.partial: torch.compile cannot trace a partial in backward)
            def default_delta_sigma_prime(delta, saved, *params):
                return _delta_times(sigma_prime, delta, saved, *params)

            default_delta_sigma_prime.__qualname__ = f"{cls.__qualname__}.delta_sigma_prime"
            default_delta_sigma_prime.__module__ = cls.__module__
            cls.delta_sigma_prime = staticmethod(default_delta_sigma_prime)
        delta_sigma_prime = cls.delta_sigma_prime

        def setup_context(ctx, inputs, output):
            ctx.params = inputs[1:]
            ctx.save_for_backward(output if source == "a" else inputs[0] if source == "z" else None)

        @without_autocast
        def backward(ctx, delta):
            (saved,) = ctx.saved_tensors
            params = ctx.params
            if not params:  # σ(z) alone (sigmoid, tanh, relu): one gradient
                return delta_sigma_prime(delta, saved)
            return delta_sigma_prime(delta, saved, *params), *(None,) * len(params)

        # forward is σ itself (no frame around it: each call's few µs show at course sizes)
        cls.forward = staticmethod(sigma)
        cls.setup_context = staticmethod(setup_context)
        cls.backward = staticmethod(backward)


class Identity(Elementwise):
    """a = z;  σ' = 1."""

    sigma_prime_from = None

    @staticmethod
    def sigma(z):
        return z.view_as(z)

    @staticmethod
    def sigma_prime(_):
        return 1.0

    @staticmethod
    def delta_sigma_prime(delta, _):
        return delta  # δ ⊙ 1: no copy


class Sigmoid(Elementwise):
    """a = 1 / (1 + e⁻ᶻ);  σ' = a (1 − a)."""

    sigma_prime_from = "a"

    @staticmethod
    def sigma(z):
        return torch.sigmoid(z)

    @staticmethod
    def sigma_prime(a):
        return a * (1 - a)

    @staticmethod
    def delta_sigma_prime(delta, a):
        # (1 − a)·a·δ in one new tensor, updated in place (autograd still tracks it). torch.rsub(a, 1) is
        # 1 − a without Tensor.__rsub__'s Python wrapper: ~5 µs a layer and step at course sizes.
        return torch.rsub(a, 1).mul_(a).mul_(delta)


class Tanh(Elementwise):
    """a = tanh z;  σ' = 1 − a²."""

    sigma_prime_from = "a"

    @staticmethod
    def sigma(z):
        return torch.tanh(z)

    @staticmethod
    def sigma_prime(a):
        return 1 - a * a

    @staticmethod
    def delta_sigma_prime(delta, a):
        # δ (1 − a²) = δ − (δa)·a: two ops, no Python scalar (each costs µs at course sizes), one new tensor
        # besides δa; rounding as torch's own 1 − a², an error of a few ulp of δ.
        return torch.addcmul(delta, delta * a, a, value=-1)


class ReLU(Elementwise):
    """a = max(z, 0);  σ' = [a > 0] (0 at z = 0, as torch; the notes leave it undefined)."""

    sigma_prime_from = "a"

    @staticmethod
    def sigma(z):
        return torch.relu(z)

    @staticmethod
    def sigma_prime(a):
        return (a > 0).to(a.dtype)

    @staticmethod
    def delta_sigma_prime(delta, a):
        # a ≥ 0, so sign(a) is [a > 0]; on CPU it is several times faster than a comparison.
        return a.sign().mul_(delta)


class LeakyReLU(Elementwise):
    """a = z for z > 0, slope·z otherwise;  σ' = 1 for z > 0, slope otherwise."""

    @staticmethod
    def sigma(z, negative_slope):
        return F.leaky_relu(z, negative_slope)

    @staticmethod
    def sigma_prime(z, negative_slope):
        return torch.where(z > 0, 1.0, torch.full_like(z, negative_slope))

    @staticmethod
    def delta_sigma_prime(delta, z, negative_slope):
        return torch.where(z > 0, delta, delta * negative_slope)


class ELU(Elementwise):
    """a = z for z > 0, α(eᶻ − 1) otherwise;  σ' = 1 for z > 0, α eᶻ otherwise."""

    @staticmethod
    def sigma(z, alpha):
        return F.elu(z, alpha)

    @staticmethod
    def sigma_prime(z, alpha):
        return torch.where(z > 0, 1.0, alpha * torch.exp(z))


class Softplus(Elementwise):
    """a = log(1 + e^{βz}) / β (a = z where βz > threshold);  σ' = sigmoid(βz) (1 past threshold)."""

    @staticmethod
    def sigma(z, beta, threshold):
        return F.softplus(z, beta, threshold)

    @staticmethod
    def sigma_prime(z, beta, threshold):
        bz = z * beta
        return torch.where(bz > threshold, 1.0, torch.sigmoid(bz))


class SiLU(Elementwise):
    """a = z sigmoid(z);  σ' = s (1 + z (1 − s)) with s = sigmoid(z)."""

    @staticmethod
    def sigma(z):
        return F.silu(z)

    @staticmethod
    def sigma_prime(z):
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


class GELU(Elementwise):
    """approximate="none": a = z Φ(z);  σ' = Φ(z) + z φ(z)   (Φ, φ: normal cdf, pdf).
    approximate="tanh": a = ½z(1 + tanh u), u = √(2/π)(z + 0.044715 z³);
                        σ' = ½(1 + tanh u) + ½z (1 − tanh² u) √(2/π)(1 + 3·0.044715 z²).
    """

    @staticmethod
    def sigma(z, approximate):
        return F.gelu(z, approximate=approximate)

    @staticmethod
    def sigma_prime(z, approximate):
        if approximate == "tanh":
            t = torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z**3))
            return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * z * z)
        cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return cdf + z * pdf

    @staticmethod
    def delta_sigma_prime(delta, z, approximate):
        if approximate == "tanh":
            return delta * GELU.sigma_prime(z, approximate)
        # δ (Φ(z) + z φ(z)) in three new tensors instead of nine (transformer MLPs are wide)
        z_pdf = (z * (z * z).mul_(-0.5).exp_()).mul_(_INV_SQRT_2PI)
        return torch.erf(z * (1 / math.sqrt(2))).add_(1).mul_(0.5).add_(z_pdf).mul_(delta)


class Softmax(torch.autograd.Function):
    """a = softmax(z) along dim;  δ_z = a ⊙ (δ − Σ_dim δ ⊙ a)   (Jacobian diag(a) − a aᵀ, applied to δ)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z, dim):
        return torch.softmax(z, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        (a,) = ctx.saved_tensors
        return a * (delta - (delta * a).sum(ctx.dim, keepdim=True)), None


class InplaceElementwise(torch.autograd.Function):
    """`inplace=True` for any Elementwise rule: z is overwritten with σ(z).

    Same backward, δ ⊙ σ'. When σ' needs z, the caller passes `z_before = z.clone()`
    taken with autograd on (as autograd does for torch's own in-place activations), so
    double backward still sees σ'(z) as a function of z. Old-style (ctx in forward)
    because `mark_dirty` needs it; torch.func.vmap therefore wants inplace=False.
    """

    @staticmethod
    def forward(ctx, rule, z, z_before, *params):
        from_output = rule.sigma_prime_from == "a"
        z.copy_(rule.sigma(z if from_output else z_before, *params))
        ctx.mark_dirty(z)
        ctx.rule, ctx.params = rule, params
        ctx.save_for_backward(z if from_output else z_before)
        return z

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        (saved,) = ctx.saved_tensors
        grad = ctx.rule.delta_sigma_prime(delta, saved, *ctx.params)
        unused = [None] * len(ctx.params)
        if ctx.rule.sigma_prime_from == "a":
            return None, grad, None, *unused
        return None, None, grad, *unused  # flows to z through the clone's own graph


# ------------------------------------------------ the activations torchvision's CNNs use (norm branch)


class Hardtanh(Elementwise):
    """a = clamp(z, min_val, max_val);  σ' = 1 for min_val < z < max_val, else 0 (0 at the kinks, as torch).

    From a: clamping is exact, so min_val < a < max_val exactly where min_val < z < max_val.
    """

    sigma_prime_from = "a"

    @staticmethod
    def sigma(z, min_val, max_val):
        return F.hardtanh(z, min_val, max_val)

    @staticmethod
    def sigma_prime(a, min_val, max_val):
        return ((a > min_val) & (a < max_val)).to(a.dtype)

    @staticmethod
    def delta_sigma_prime(delta, a, min_val, max_val):
        return torch.where((a > min_val) & (a < max_val), delta, 0.0)


class ReLU6(Elementwise):
    """a = min(max(z, 0), 6) (Hardtanh(0, 6));  σ' = 1 for 0 < z < 6, else 0 (from a, as Hardtanh)."""

    sigma_prime_from = "a"

    @staticmethod
    def sigma(z):
        return F.relu6(z)

    @staticmethod
    def sigma_prime(a):
        return Hardtanh.sigma_prime(a, 0.0, 6.0)

    @staticmethod
    def delta_sigma_prime(delta, a):
        return Hardtanh.delta_sigma_prime(delta, a, 0.0, 6.0)


_ONE_SIXTH = float(torch.tensor(1 / 6, dtype=torch.float32))  # torch's hardsigmoid slope, in any dtype


class Hardsigmoid(Elementwise):
    """a = clamp(z/6 + 1/2, 0, 1);  σ' = 1/6 for −3 < z < 3, else 0 (0 at ±3, as torch).

    From z, not a: near z = ±3, z/6 + 1/2 may round onto 0 or 1 while torch's σ' is still 1/6.
    The slope is torch's constant, 1/6 rounded to float32 (its kernel uses that in float64 too).
    """

    @staticmethod
    def sigma(z):
        return F.hardsigmoid(z)

    @staticmethod
    def sigma_prime(z):
        return torch.where((z > -3) & (z < 3), _ONE_SIXTH, torch.zeros_like(z))


class Hardswish(Elementwise):
    """a = z · clamp(z + 3, 0, 6)/6;  σ' = 0 for z ≤ −3, z/3 + 1/2 for −3 < z < 3, 1 for z ≥ 3 (as torch)."""

    @staticmethod
    def sigma(z):
        return F.hardswish(z)

    @staticmethod
    def sigma_prime(z):
        return torch.where(z <= -3, 0.0, torch.where(z < 3, z / 3 + 0.5, 1.0))


class Mish(Elementwise):
    """a = z tanh(softplus(z));  σ' = t + z s (1 − t²), t = tanh(softplus(z)), s = sigmoid(z) = softplus'(z)."""

    @staticmethod
    def sigma(z):
        return F.mish(z)

    @staticmethod
    def sigma_prime(z):
        t = torch.tanh(F.softplus(z))
        return t + z * torch.sigmoid(z) * (1 - t * t)


class PReLU(torch.autograd.Function):
    """a = z for z > 0, α_c z otherwise: LeakyReLU with a learnt slope, one per channel (dim 1) or one in all.

        σ' = 1 for z > 0, α_c otherwise (α_c at z = 0, as torch)
        δ_z = δ ⊙ σ'
        ∂J/∂α_c = Σ δ · min(z, 0) over every dim but the channel dim (`prelu_weight_grad`)
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z, weight):
        return F.prelu(z, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, weight = inputs
        ctx.call = observe.keep(ctx, weight)
        ctx.save_for_backward(z, weight, *observe.output(ctx, output))

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        z, weight, *output = ctx.saved_tensors
        need_z, need_weight = ctx.needs_input_grad
        if ctx.call is not None:
            (alpha,) = ctx.params
            ctx.call.see(observe.Seen(
                ctx.call, delta, z, ctx.params,
                per_sample=lambda d, x: (per_sample_prelu_weight_grads(d, x, alpha),),
                sq_norms=lambda d, x: per_sample_prelu_weight_grads(d, x, alpha).square().flatten(1).sum(1),
                output=output[0] if output else None, batch_dim=0,  # (N, C, *): channels in dim 1
            ))
            (need_weight,) = observe.needs(ctx, need_weight)  # book-keeping DP-SGD forms it clipped
        alpha = prelu_slopes(weight, z)
        grad_z = torch.where(z > 0, delta, delta * alpha) if need_z else None
        grad_weight = prelu_weight_grad(delta, z, weight) if need_weight else None
        return grad_z, grad_weight


def prelu_slopes(weight, z):
    """α shaped to broadcast against z: one slope for all, or one per channel (dim 1)."""
    if weight.numel() == 1:
        return weight.reshape(())
    return weight.reshape((-1,) + (1,) * (z.dim() - 2))


def prelu_weight_grad(delta, z, weight):
    """∂J/∂α = Σ δ · min(z, 0), summed over every dim but the channel dim; shaped like `weight`."""
    contribution = delta * torch.clamp(z, max=0)
    if weight.numel() == 1:
        return contribution.sum().reshape(weight.shape)
    return contribution.sum([d for d in range(z.dim()) if d != 1]).reshape(weight.shape)


def per_sample_prelu_weight_grads(delta, z, weight):
    """Sample n's ∂J/∂α = Σ δₙ · min(zₙ, 0) over the sample's dims but the channel dim (dim 1 of δ, z with
    the sample dimension first): (N, *weight.shape)."""
    contribution = delta * torch.clamp(z, max=0)
    dims = list(range(1, z.dim())) if weight.numel() == 1 else [d for d in range(2, z.dim())]
    grad = contribution.sum(dims) if dims else contribution
    return grad.reshape(z.shape[0], *weight.shape).to(weight.dtype)


# Autograd calls each rule's backward directly (see `_apply.direct_backward`). Elementwise
# defines backward in __init_subclass__, before torch's metaclass makes the class's graph-node type,
# so the rules are handed over here, once all are defined (and PReLU, Softmax, InplaceElementwise too).
for _rule in (*Elementwise.__subclasses__(), PReLU, Softmax, InplaceElementwise):
    direct_backward(_rule)
