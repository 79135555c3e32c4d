"""Normalisation: BatchNorm, LayerNorm, GroupNorm, RMSNorm, with δ through the normalisation written once.

Every rule here normalises x over some of its elements (its "group": a channel over the
batch, a sample's last dims, a group of channels) and applies a per-feature affine map:

    forward:   x̂ = (x − μ) / σ        μ, σ² = mean, biased variance over the group; σ = √(σ² + eps)
               y = γ x̂ + β            γ, β per feature (channel, or normalized_shape)
    backward:  g = δ γ                 (δ = ∂J/∂y)
               ∂J/∂x = (1/σ)(g − mean(g) − x̂·mean(g·x̂))        means over the group
               ∂J/∂γ = Σ δ·x̂,   ∂J/∂β = Σ δ                    sums over everything but the feature

RMSNorm drops the centring: x̂ = x / rms, rms = √(mean(x²) + eps), and its δ loses the mean(g)
term: ∂J/∂x = (1/rms)(g − x̂·mean(g·x̂)). `delta_through_normalization` is that one formula,
used by every rule; `affine_grads` is the weight gradient, a small pure function of (δ, x̂).

Each rule returns its statistics as extra, non-differentiable outputs (as torch's native_*_norm
do), so backward reads them instead of recomputing; when double backward is asked for
(grad mode on inside backward), backward recomputes them from x in differentiable ops so that
autograd sees σ as a function of x. Low-precision inputs (bf16, fp16) are normalised in
float32 and the output is cast back, as torch's kernels do; γ and β may stay float32 beside a
low-precision input (autocast leaves norms in the input's dtype on CPU).

On CPU, for contiguous float32/float64 inputs without double backward, LayerNorm, GroupNorm and
BatchNorm in training run these same formulas as plain loops (`csrc/norm.cpp`, loaded by
`_native_norm`): five passes over x for forward + backward where the ops below take about ten.
Everything else (observe, other layouts and dtypes, double backward, torch.func, torch.compile)
runs the Python below, the definition the loops are tested equal to.
"""

from __future__ import annotations

import math

import torch

from manual_backprop import observe
from manual_backprop._amp import without_autocast
from manual_backprop.rules import _native_norm


def opmath(t: torch.Tensor) -> torch.Tensor:
    """Low-precision floats are computed in float32, as torch's normalisation kernels do."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def mean_and_variance(x, dims):
    """μ and the biased σ² = mean((x − μ)²) over `dims` (kept).

    Two passes, not torch.var_mean: on CPU its kernel took 3.2 ms where these took 0.45 ms
    (16×128×256, this project's machine), and the two-pass form is as accurate."""
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    return mean, (centered * centered).mean(dims, keepdim=True)


def statistics(x, dims, eps: float, centered: bool = True):
    """(μ, 1/σ) over `dims` (kept), or (None, 1/rms) without centring."""
    if centered:
        mean, var = mean_and_variance(x, dims)
        return mean, torch.rsqrt(var + eps)
    return None, torch.rsqrt((x * x).mean(dims, keepdim=True) + eps)


def normalize(x, dims, eps: float, centered: bool = True):
    """(x̂, μ, 1/σ): forward's normalisation, x − μ computed once for σ² and for x̂."""
    mean = x.mean(dims, keepdim=True) if centered else None
    x_centered = x - mean if centered else x
    rstd = torch.rsqrt((x_centered * x_centered).mean(dims, keepdim=True) + eps)
    return x_centered * rstd, mean, rstd


def _affine(x_hat, weight, bias):
    """γ x̂ + β (one pass when both are given)."""
    if weight is not None and bias is not None:
        return torch.addcmul(bias, x_hat, weight)
    if weight is not None:
        return x_hat * weight
    return x_hat if bias is None else x_hat + bias


def normalized(x, mean, rstd):
    """x̂ = (x − μ)/σ, or x/rms when mean is None."""
    return (x if mean is None else x - mean) * rstd


def delta_through_normalization(g, x_hat, rstd, dims, centered: bool = True):
    """∂J/∂x = (1/σ)(g − mean(g) − x̂·mean(g·x̂)), means over `dims`; RMSNorm (not centered): no mean(g).

    BatchNorm uses the same formula expanded per channel (`per_channel_delta`)."""
    projection = (g * x_hat).mean(dims, keepdim=True)
    if centered:
        g = g - g.mean(dims, keepdim=True)
    return (g - x_hat * projection) * rstd


def affine_grads(delta, x_hat, sum_dims, need_gamma: bool, need_beta: bool):
    """∂J/∂γ = Σ δ·x̂ and ∂J/∂β = Σ δ over `sum_dims` (every dim that is not a feature dim).

    The weight gradient shared by every rule here (per-sample mechanisms reuse it per sample).
    """
    total = (lambda t: t.sum(sum_dims)) if sum_dims else (lambda t: t)  # sum(()) would sum everything
    return (total(delta * x_hat) if need_gamma else None), (total(delta) if need_beta else None)


def per_sample_affine_grads(delta, x_hat, feature_dims, gamma, beta):
    """Sample n's ∂J/∂γ = Σ δₙ·x̂ₙ and ∂J/∂β = Σ δₙ over the sample's non-feature dims, for δ, x̂ with the
    sample dimension first: (N, *γ.shape) each, None where γ or β is None (`affine_grads`, per sample).
    `feature_dims`: the dims of δ that index γ's features."""
    sum_dims = [d for d in range(1, delta.dim()) if d not in feature_dims]
    delta, x_hat = opmath(delta), None if x_hat is None else opmath(x_hat)
    total = (lambda t: t.sum(sum_dims)) if sum_dims else (lambda t: t)

    def shaped(g, p):
        return g.reshape(g.shape[0], *p.shape).to(p.dtype)

    return (
        None if gamma is None else shaped(total(delta * x_hat), gamma),
        None if beta is None else shaped(total(delta), beta),
    )


def _sum_of_squares(per_sample):
    """`Seen.sq_norms` from `per_sample` where the gradients are as small as γ, β: form them, sum their squares."""

    def sq_norms(delta, a):
        grads = [g for g in per_sample(delta, a) if g is not None]
        return sum(opmath(g).square().flatten(1).sum(1) for g in grads)

    return sq_norms


def norm_seen(call, delta, x, params, per_sample, output=None, batch_dim=None):
    """What a normalisation rule reports to `observe`; per-sample norms from the (small) per-sample ∂γ, ∂β.
    batch_dim: 0 for the (N, C, *) rules (BatchNorm, GroupNorm); None (the call's) for LayerNorm, RMSNorm."""
    return observe.Seen(call, delta, x, params, per_sample=per_sample, sq_norms=_sum_of_squares(per_sample),
                        output=output, batch_dim=batch_dim)


def _channel_view(t, x):
    """A per-channel (C,) tensor shaped to broadcast against x: (N, C, *) → (1, C, 1, …)."""
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def _grouped(x, num_groups):
    """(N, C, *) viewed as (N, G, C/G · Π*) (sizes spelt out: N may be 0)."""
    return x.reshape(x.shape[0], num_groups, x.shape[1] // num_groups * math.prod(x.shape[2:]))


def channels_last_format(x):
    """x's channels_last memory format, or None (torch's kernels give outputs and ∂J/∂x in it)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt) else None


def _layout_of(t, x=None, fmt=None):
    """t in x's (or fmt's) channels_last memory format where x has one; else t unchanged."""
    fmt = channels_last_format(x) if x is not None else fmt
    return t if fmt is None else t.contiguous(memory_format=fmt)


def _cast_back(grad, like):
    return None if grad is None else grad.to(like.dtype)


# ------------------------------------------------------------------ the native loops (csrc/norm.cpp)


def _native_forward(x, weight, bias, eps, rows: int, groups: int, spatial: int, stats_shape):
    """y, μ, 1/σ from the native loops where they may run (`_native_norm.rows_now`), else None.
    x as `rows` rows normalised alone; `groups`, `spatial` place γ, β in a row (csrc/norm.cpp)."""
    native = _native_norm.rows_now(x, weight, bias)
    if native is None:
        return None
    _native_norm.calls["forward"] += 1
    y, mean, rstd = native.forward(x, weight, bias, rows, groups, spatial, eps)
    return y, mean.view(stats_shape), rstd.view(stats_shape)


def _native_backward(delta, x, weight, bias, mean, rstd, groups: int, spatial: int, needs):
    """(∂J/∂x, ∂J/∂γ, ∂J/∂β) from the native loops where they may run, else None; the same formulas as
    `delta_through_normalization` and `affine_grads`. needs: (∂J/∂x, ∂J/∂γ, ∂J/∂β) asked for."""
    if torch.is_grad_enabled():  # double backward: the Python rule, whose ops autograd can differentiate
        return None
    native = _native_norm.rows_now(x, weight)
    if native is None or delta.dtype != x.dtype:
        return None
    _native_norm.calls["backward"] += 1
    need_x, need_gamma, need_beta = needs[0], needs[1] and weight is not None, needs[2] and bias is not None
    grads = native.backward(delta.contiguous(), x, mean.reshape(-1), rstd.reshape(-1), weight, mean.numel(),
                            groups, spatial, need_x, need_gamma, need_beta)
    return tuple(g.view(p.shape) if need and p is not None else None
                 for g, p, need in zip(grads, (x, weight, bias), (need_x, need_gamma, need_beta)))


# ------------------------------------------------------------------ BatchNorm


def batch_dims(x) -> list[int]:
    """BatchNorm normalises each channel (dim 1) over the batch and every spatial position."""
    return [0, *range(2, x.dim())]


def _native_channels(x) -> bool:
    """Whether BatchNorm's native loops suit x: runs of at least 16 positions per (sample, channel); over
    (N, C) or short runs the loops would stride through memory a few elements at a time."""
    return x.dim() > 2 and x.numel() > 0 and math.prod(x.shape[2:]) >= 16


def _per_channel_affine(mean, var, weight, bias, eps):
    """γ x̂ + β = x·s + t per channel, s = γ/σ, t = β − μ s: two passes over x instead of four."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * opmath(weight)
    shift = -mean * scale
    return scale, shift if bias is None else shift + opmath(bias)



def _save_with_statistics(ctx, tensors, statistics, output=None) -> None:
    """Save the inputs and the forward's statistics (extra outputs that carry no gradient of their own),
    then the output y when a watching observer asks for it (`observe.output`)."""
    ctx.mark_non_differentiable(*statistics)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*tensors, *statistics, *observe.output(ctx, output))

class BatchNorm(torch.autograd.Function):
    """Training-mode batch normalisation of x: (N, C, *), statistics per channel over (N, *).

        y = γ x̂ + β,  x̂ = (x − μ_c)/σ_c,  μ_c, σ_c² over the batch (biased variance)
        ∂J/∂x = (1/σ)(g − mean(g) − x̂·mean(g·x̂)),  g = δ γ
        ∂J/∂γ = Σ_{n,*} δ·x̂,   ∂J/∂β = Σ_{n,*} δ

    Returns (y, μ, σ²) with μ, σ² of shape (C,) non-differentiable: the caller updates the
    running statistics from them (a no-grad side effect, not part of the gradient).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps):
        native = _native_norm.rows_now(x, weight, bias) if _native_channels(x) else None
        if native is not None:  # the same formulas as plain loops (csrc/norm.cpp)
            _native_norm.calls["batch_forward"] += 1
            return native.batch_forward(x, weight, bias, eps)
        x32 = opmath(x)
        mean, var = mean_and_variance(x32, batch_dims(x))
        mean, var = mean.reshape(-1), var.reshape(-1)
        scale, shift = _per_channel_affine(mean, var, weight, bias, eps)
        return (x32 * _channel_view(scale, x) + _channel_view(shift, x)).to(x.dtype), mean, var

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, ctx.eps = inputs
        ctx.call = observe.keep(ctx, weight, bias)
        _save_with_statistics(ctx, (x, weight, bias), output[1:], output[0])

    @staticmethod
    @without_autocast
    def backward(ctx, delta, _mean, _var):
        x, weight, bias, mean, var, *output = ctx.saved_tensors
        need_x, need_gamma, need_beta, _ = ctx.needs_input_grad
        if delta is None:
            return None, None, None, None
        if ctx.call is not None:  # δ and a for the tape; no per-sample gradient: the batch statistics mix samples
            refuse = observe.mixes_samples(
                "batch normalisation in training mode mixes the samples of a batch (its statistics are over the "
                "batch), so it has no per-sample gradients; put it in eval mode, or use GroupNorm/LayerNorm"
            )
            ctx.call.see(observe.Seen(ctx.call, delta, x, ctx.params, refuse, refuse, *output, batch_dim=0))
        native = _native_norm.rows_now(x, weight) if _native_channels(x) and not torch.is_grad_enabled() else None
        if native is not None and delta.dtype == x.dtype:  # the same formulas as plain loops (csrc/norm.cpp)
            _native_norm.calls["batch_backward"] += 1
            grads = native.batch_backward(delta.contiguous(), x, mean, var, weight, ctx.eps, need_x,
                                          need_gamma and weight is not None, need_beta and bias is not None)
            return *(g if need else None for g, need in zip(grads, (need_x, need_gamma, need_beta))), None
        x32, delta32, dims = opmath(x), opmath(delta), batch_dims(x)
        if torch.is_grad_enabled():  # double backward: statistics as functions of x
            mean, rstd = statistics(x32, dims, ctx.eps)
        else:
            mean, rstd = _channel_view(mean, x), _channel_view(torch.rsqrt(var + ctx.eps), x)
        # ∂J/∂γ = Σδx̂ and ∂J/∂β = Σδ; δ needs the same two sums (x̂ = (x − μ)/σ, not formed)
        sum_delta = delta32.sum(dims)
        sum_delta_x_hat = (delta32 * (x32 - mean)).sum(dims) * rstd.reshape(-1)
        grad_x = None
        if need_x:
            gamma_rstd = rstd if weight is None else rstd * _channel_view(opmath(weight), x)
            sums = _channel_view(sum_delta, x), _channel_view(sum_delta_x_hat, x)
            grad_x = per_channel_delta(delta32, x32, mean, rstd, gamma_rstd, *sums, x.numel() // max(x.shape[1], 1))
            grad_x = _layout_of(grad_x.to(x.dtype), x)
        grad_gamma = sum_delta_x_hat if need_gamma else None
        grad_beta = sum_delta if need_beta else None
        return grad_x, _cast_back(grad_gamma, weight), _cast_back(grad_beta, bias), None


def per_channel_delta(delta, x, mean, rstd, gamma_rstd, sum_delta, sum_delta_x_hat, n):
    """The shared δ where γ and σ are constant over each group (BatchNorm's channels):

        (γ/σ)(δ − mean(δ) − x̂·mean(δ·x̂)),  mean(δ) = Σδ/n,  mean(δ·x̂) = Σδx̂/n  (∂J/∂β/n, ∂J/∂γ/n)
        = a δ + b x + c per channel, with x̂ = (x − μ)/σ expanded:
          a = γ/σ,   b = −a·mean(δx̂)/σ,   c = −a·mean(δ) − b μ

    Two passes over x instead of seven (`delta_through_normalization` with g = δγ, which it equals;
    tests/test_norm.py checks that).
    """
    a = gamma_rstd
    b = -a * (sum_delta_x_hat / n) * rstd
    c = -a * (sum_delta / n) - b * mean
    return (x * b + c).addcmul_(delta, a)  # in place on a fresh tensor: autograd still tracks it


class BatchNormEval(torch.autograd.Function):
    """Eval-mode batch normalisation: the running statistics make it a per-channel affine map.

        y = γ (x − μ_run)/σ_run + β,   σ_run = √(var_run + eps)
        ∂J/∂x = δ γ / σ_run,   ∂J/∂γ = Σ_{n,*} δ·x̂,   ∂J/∂β = Σ_{n,*} δ

    The running statistics are constants (buffers): no gradient reaches them.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, running_mean, running_var, weight, bias, eps):
        scale, shift = _per_channel_affine(running_mean, running_var, weight, bias, eps)
        return (opmath(x) * _channel_view(scale, x) + _channel_view(shift, x)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, running_mean, running_var, weight, bias, ctx.eps = inputs
        need_gamma = ctx.needs_input_grad[3]
        ctx.channels_last = channels_last_format(x)
        ctx.call = observe.keep(ctx, weight, bias)
        ctx.save_for_backward(x if need_gamma or ctx.call else None, running_mean, running_var, weight, bias,
                              *observe.output(ctx, output))

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        x, running_mean, running_var, weight, bias, *output = ctx.saved_tensors
        need_x, _, _, need_gamma, need_beta, _ = ctx.needs_input_grad
        if ctx.call is not None:
            eps = ctx.eps

            def per_sample(d, a):  # x̂ from the running statistics: constants, so each sample's own
                rstd = _channel_view(torch.rsqrt(running_var + eps), a)
                x_hat = normalized(opmath(a), _channel_view(running_mean, a), rstd)
                return per_sample_affine_grads(d, x_hat, [1], weight, bias)

            ctx.call.see(norm_seen(ctx.call, delta, x, ctx.params, per_sample, *output, batch_dim=0))
        need_gamma, need_beta = observe.needs(ctx, need_gamma, need_beta)  # book-keeping DP-SGD forms them clipped
        delta32 = opmath(delta)
        rstd = _channel_view(torch.rsqrt(running_var + ctx.eps), delta)
        grad_x = None
        if need_x:
            scale = rstd if weight is None else rstd * _channel_view(opmath(weight), delta)
            grad_x = _layout_of((delta32 * scale).to(delta.dtype), fmt=ctx.channels_last)
        x_hat = normalized(opmath(x), _channel_view(running_mean, x), rstd) if need_gamma else None
        grad_gamma, grad_beta = affine_grads(delta32, x_hat, batch_dims(delta), need_gamma, need_beta)
        return grad_x, None, None, _cast_back(grad_gamma, weight), _cast_back(grad_beta, bias), None


# ------------------------------------------------------------------ LayerNorm and RMSNorm


def last_dims(x, normalized_shape) -> list[int]:
    """The dims LayerNorm/RMSNorm normalise over: the last len(normalized_shape)."""
    return list(range(x.dim() - len(normalized_shape), x.dim()))


def leading_dims(x, normalized_shape) -> list[int]:
    """The dims ∂J/∂γ sums over: all before normalized_shape."""
    return list(range(x.dim() - len(normalized_shape)))


class LayerNorm(torch.autograd.Function):
    """Layer normalisation of x: (*, *normalized_shape), statistics per sample over normalized_shape.

        y = γ x̂ + β,  x̂ = (x − μ)/σ over the last len(normalized_shape) dims
        ∂J/∂x = (1/σ)(g − mean(g) − x̂·mean(g·x̂)),  g = δ γ
        ∂J/∂γ = Σ_* δ·x̂,   ∂J/∂β = Σ_* δ    (γ, β: normalized_shape)

    Returns (y, μ, 1/σ); μ and 1/σ are non-differentiable, saved for backward.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, normalized_shape, weight, bias, eps):
        D, lead = math.prod(normalized_shape), x.shape[: x.dim() - len(normalized_shape)]
        native = _native_forward(x, weight, bias, eps, x.numel() // max(D, 1), 1, 1, (*lead, *[1] * len(normalized_shape)))
        if native is not None:
            return native
        x_hat, mean, rstd = normalize(opmath(x), last_dims(x, normalized_shape), eps)
        y = _affine(x_hat, None if weight is None else opmath(weight), None if bias is None else opmath(bias))
        return y.to(x.dtype), mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.normalized_shape, weight, bias, ctx.eps = inputs
        ctx.call = observe.keep(ctx, weight, bias)
        _save_with_statistics(ctx, (x, weight, bias), output[1:], output[0])

    @staticmethod
    @without_autocast
    def backward(ctx, delta, _mean, _rstd):
        x, weight, bias, mean, rstd, *output = ctx.saved_tensors
        if delta is None:
            return None, None, None, None, None
        if ctx.call is not None:
            _see_last_dims(ctx, delta, x, True, output)
        native = _native_backward(delta, x, weight, bias, mean, rstd, 1, 1,
                                  (ctx.needs_input_grad[0], *observe.needs(ctx, *ctx.needs_input_grad[2:4])))
        if native is not None:
            return native[0], None, native[1], native[2], None
        grad_x, grad_gamma, grad_beta = _normalization_backward(
            ctx, delta, x, weight, bias, mean, rstd, centered=True
        )
        return grad_x, None, grad_gamma, grad_beta, None


class RMSNorm(torch.autograd.Function):
    """RMS normalisation: x̂ = x / rms, rms = √(mean(x²) + eps) over normalized_shape; y = γ x̂.

        ∂J/∂x = (1/rms)(g − x̂·mean(g·x̂)),  g = δ γ      (LayerNorm's δ without the centring term)
        ∂J/∂γ = Σ_* δ·x̂

    eps is resolved by the caller (torch's default: the machine epsilon of the computing dtype).
    Returns (y, 1/rms); 1/rms is non-differentiable, saved for backward.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, normalized_shape, weight, eps):
        x_hat, _, rstd = normalize(opmath(x), last_dims(x, normalized_shape), eps, centered=False)
        return (x_hat if weight is None else x_hat * opmath(weight)).to(x.dtype), rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.normalized_shape, weight, ctx.eps = inputs
        ctx.call = observe.keep(ctx, weight)
        _save_with_statistics(ctx, (x, weight), output[1:], output[0])

    @staticmethod
    @without_autocast
    def backward(ctx, delta, _rstd):
        x, weight, rstd, *output = ctx.saved_tensors
        if delta is None:
            return None, None, None, None
        if ctx.call is not None:
            _see_last_dims(ctx, delta, x, False, output)
        grad_x, grad_gamma, _ = _normalization_backward(ctx, delta, x, weight, None, None, rstd, centered=False)
        return grad_x, None, grad_gamma, None


def _see_last_dims(ctx, delta, x, centered: bool, output) -> None:
    """LayerNorm's and RMSNorm's report: x̂ per sample from the sample's own statistics over normalized_shape."""
    normalized_shape, eps, params = ctx.normalized_shape, ctx.eps, ctx.params
    weight, bias = params if centered else (params[0], None)

    def per_sample(d, a):
        dims = last_dims(a, normalized_shape)
        x_hat = normalize(opmath(a), dims, eps, centered)[0]
        return per_sample_affine_grads(d, x_hat, dims, weight, bias)[: len(params)]

    ctx.call.see(norm_seen(ctx.call, delta, x, params, per_sample, *output))


def _normalization_backward(ctx, delta, x, weight, bias, mean, rstd, centered):
    """LayerNorm's and RMSNorm's backward: the shared δ, then γ's and β's sums over the leading dims."""
    need_x, _, need_gamma, need_beta = ctx.needs_input_grad[:4]
    need_beta = need_beta and centered  # RMSNorm's 4th input is eps
    # book-keeping DP-SGD forms γ's and β's gradients clipped (RMSNorm keeps γ alone)
    need_gamma, need_beta = observe.needs(ctx, need_gamma, need_beta) if centered else (*observe.needs(ctx, need_gamma), False)
    x32, delta32 = opmath(x), opmath(delta)
    dims = last_dims(x, ctx.normalized_shape)
    if torch.is_grad_enabled():  # double backward: statistics as functions of x
        mean, rstd = statistics(x32, dims, ctx.eps, centered)
    x_hat = normalized(x32, mean, rstd)
    grad_x = None
    if need_x:
        g = delta32 if weight is None else delta32 * opmath(weight)
        grad_x = delta_through_normalization(g, x_hat, rstd, dims, centered).to(x.dtype)
    grad_gamma, grad_beta = affine_grads(
        delta32, x_hat, leading_dims(x, ctx.normalized_shape), need_gamma and weight is not None, need_beta
    )
    return grad_x, _cast_back(grad_gamma, weight), _cast_back(grad_beta, bias)


# ------------------------------------------------------------------ GroupNorm


class GroupNorm(torch.autograd.Function):
    """Group normalisation of x: (N, C, *): the C channels split into G groups of C/G; statistics
    per sample and group, over the group's channels and every spatial position.

        x viewed as (N, G, C/G · Π*):  x̂ = (x − μ)/σ over the last dim;  y = γ_c x̂ + β_c
        ∂J/∂x = (1/σ)(g − mean(g) − x̂·mean(g·x̂)) per (n, group),  g = δ γ
        ∂J/∂γ = Σ_{n,*} δ·x̂,   ∂J/∂β = Σ_{n,*} δ    (γ, β: (C,))

    Returns (y, μ, 1/σ) with μ, 1/σ of shape (N, G, 1), non-differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, num_groups, weight, bias, eps):
        native = _native_forward(x, weight, bias, eps, x.shape[0] * num_groups, num_groups,
                                 math.prod(x.shape[2:]), (x.shape[0], num_groups, 1))
        if native is not None:
            return native
        x_hat, mean, rstd = normalize(_grouped(opmath(x), num_groups), [2], eps)
        weight, bias = (None if t is None else _channel_view(opmath(t), x) for t in (weight, bias))
        return _layout_of(_affine(x_hat.reshape(x.shape), weight, bias).to(x.dtype), x), mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.num_groups, weight, bias, ctx.eps = inputs
        ctx.call = observe.keep(ctx, weight, bias)
        _save_with_statistics(ctx, (x, weight, bias), output[1:], output[0])

    @staticmethod
    @without_autocast
    def backward(ctx, delta, _mean, _rstd):
        x, weight, bias, mean, rstd, *output = ctx.saved_tensors
        need_x, _, need_gamma, need_beta, _ = ctx.needs_input_grad
        if delta is None:
            return None, None, None, None, None
        if ctx.call is not None:
            num_groups, eps = ctx.num_groups, ctx.eps

            def per_sample(d, a):  # each sample's statistics are its own (per sample and group)
                x_hat = normalize(_grouped(opmath(a), num_groups), [2], eps)[0].reshape(a.shape)
                return per_sample_affine_grads(d, x_hat, [1], weight, bias)

            ctx.call.see(norm_seen(ctx.call, delta, x, ctx.params, per_sample, *output, batch_dim=0))
        need_gamma, need_beta = observe.needs(ctx, need_gamma, need_beta)  # book-keeping DP-SGD forms them clipped
        native = _native_backward(delta, x, weight, bias, mean, rstd, ctx.num_groups, math.prod(x.shape[2:]),
                                  (need_x, need_gamma, need_beta))
        if native is not None:
            return native[0], None, native[1], native[2], None
        x32, delta32 = opmath(x), opmath(delta)
        grouped = _grouped(x32, ctx.num_groups)
        if torch.is_grad_enabled():  # double backward: statistics as functions of x
            mean, rstd = statistics(grouped, [2], ctx.eps)
        x_hat = normalized(grouped, mean, rstd)  # (N, G, C/G · Π*)
        grad_x = None
        if need_x:
            g = delta32 if weight is None else delta32 * _channel_view(opmath(weight), x)
            g = g.reshape(grouped.shape)
            grad_x = _layout_of(delta_through_normalization(g, x_hat, rstd, [2]).reshape(x.shape).to(x.dtype), x)
        grad_gamma, grad_beta = affine_grads(
            delta32, x_hat.reshape(x.shape), batch_dims(x), need_gamma and weight is not None, need_beta and bias is not None
        )
        return grad_x, None, _cast_back(grad_gamma, weight), _cast_back(grad_beta, bias), None
