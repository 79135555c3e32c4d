"""The whole network as one rule: the notes' forward and backward loops, fused.

    forward    z(l+1) = a(l) W(l)ᵀ + b(l),   a(l+1) = σ(z(l+1))          l = 0 … L−1
    backward   δ(L) = ∂J/∂z(L)  (from the loss, through the output σ' if any)
               ∂J/∂W(l) = δ(l+1)ᵀ a(l),   ∂J/∂b(l) = Σₙ δ(l+1)
               δ(l) = (δ(l+1) W(l)) ⊙ σ'(·)                            l = L−1 … 0

One autograd node for the network instead of two per layer. Only what the math
needs is kept: the activations a(l) (σ' from a where the activation allows: sigmoid
a(1−a), tanh 1−a², relu [a>0], identity 1) and z(l) only for activations whose σ'
needs it. σ and σ' come from the `Elementwise` rules in `activations`.

The hidden a(l) and z(l) are returned as extra outputs (the caller keeps only the
first) for one reason: double backward. Saved as outputs they stay attached to the
graph, so the second derivative through σ'(a(l)) reaches W and the input; the
incoming gradients for them (None in ordinary training) are added where the loop
passes a(l) and z(l).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from manual_backprop import observe
from manual_backprop._amp import without_autocast
from manual_backprop.rules import _native
from manual_backprop.rules._apply import apply_rule
from manual_backprop.rules.linear import linear_seen, weight_and_bias_grads


def activation(rule: type, *params) -> tuple:
    """One layer's activation for `MLP`: an Elementwise rule's σ, δ ⊙ σ', where σ' reads from, and
    its extra arguments (LeakyReLU's slope…). Plain functions and values, so torch.compile
    traces them as constants."""
    return (rule.sigma, rule.delta_sigma_prime, rule.sigma_prime_from, params)


def _sigma_prime_source(activation) -> str | None:
    return None if activation is None else activation[2]


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """(*, features) -> (n, features): every leading dimension flattened into one."""
    return t if t is None or t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _by_layer(layers, kept) -> list:
    """The z(l+1) (or their gradients) kept for layers whose σ' reads z, by layer; None elsewhere."""
    kept = iter(kept)
    return [next(kept, None) if _sigma_prime_source(activation) == "z" else None for activation in layers]


def _times_sigma_prime(grad_a, activation, a, z):
    """δ = ∂J/∂a ⊙ σ'(a or z), by the layer's Elementwise rule."""
    if activation is None or grad_a is None:
        return grad_a
    _, delta_sigma_prime, source, params = activation
    return delta_sigma_prime(grad_a, a if source == "a" else z, *params)  # source None: saved nothing


def _plus(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
    return y if x is None else x if y is None else x + y


class MLP(torch.autograd.Function):
    """out = σ_L(… σ_1(a W₀ᵀ + b₀) …)  for a: (*, in); `layers`: per layer, the activation
    made by `activation(rule, *params)`, or None (z is the layer's output);
    then W₀, b₀, W₁, b₁, … (W: (out, in) in torch's layout, b: (out,) or None).

    Returns (out, a(1) … a(L−1), the z(l) of activations whose σ' needs z); every
    tensor but `out` is (n, features) with the leading dimensions of `a` flattened to n.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, layers, *weights_and_biases):
        leading = a.shape[:-1]
        a = _rows(a)
        activations, zs = [], []
        for activation, W, b in zip(layers, weights_and_biases[0::2], weights_and_biases[1::2]):
            z = F.linear(a, W, b)
            if activation is None:
                a = z
            else:
                sigma, _, source, params = activation
                a = sigma(z, *params)
                if source == "z":
                    zs.append(z)
            activations.append(a)
        out = activations.pop()
        return (out.reshape(*leading, out.shape[-1]) if len(leading) != 1 else out, *activations, *zs)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        a, layers, *weights_and_biases = inputs
        out, *kept = outputs
        ctx.layers, ctx.input_shape = layers, a.shape
        # Unused extra outputs get None, not zero-filled tensors of every hidden size.
        ctx.set_materialize_grads(False)
        need_a0, _, *need_params = ctx.needs_input_grad
        # δ must travel down to the lowest layer with a parameter that wants a gradient (or to a(0));
        # to every layer, with a(0), while someone watches (`observe`: the tape, per-sample gradients).
        ctx.call = observe.keep(ctx, *weights_and_biases)
        wanted = [l for l in range(len(layers)) if need_params[2 * l] or need_params[2 * l + 1]]
        ctx.lowest = 0 if need_a0 or ctx.call else min(wanted, default=len(layers))
        # W(l) carries δ below layer l; a(0) gives ∂J/∂W(0); the output gives σ' on the last layer.
        Ws = [W if l > ctx.lowest or need_a0 else None for l, W in enumerate(weights_and_biases[0::2])]
        from_a = _sigma_prime_source(layers[-1]) == "a"
        ctx.save_for_backward(a if need_params[0] or ctx.call else None, out if from_a else None, *Ws, *kept)
        ctx.carry = None  # a learning rule's carry(l, δ, W(l)) for ∂J/∂a(l) (plugins.feedback_alignment); None: δ W

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out, *grad_kept):
        layers, L = ctx.layers, len(ctx.layers)
        a0, out, *saved = ctx.saved_tensors
        W = saved[:L]
        a = [_rows(a0), *saved[L : 2 * L - 1], _rows(out)]  # a[l] = a(l), the input of layer l; a[L] the output
        z, grad_z = _by_layer(layers, saved[2 * L - 1 :]), _by_layer(layers, grad_kept[L - 1 :])
        grad_hidden = [*grad_kept[: L - 1], None]  # gradients that reached a(l+1) directly (double backward)
        need_a0, _, *need = ctx.needs_input_grad
        if ctx.call is not None:  # book-keeping DP-SGD forms the parameters' gradients clipped
            need = observe.needs(ctx, *need)

        grads = [None] * (2 * L)
        grad_a = None if grad_out is None else _rows(grad_out)  # ∂J/∂a(L)
        for l in reversed(range(L)):
            if grad_hidden[l] is not None:
                grad_a = _plus(grad_a, grad_hidden[l])
            delta = _plus(_times_sigma_prime(grad_a, layers[l], a[l + 1], z[l]), grad_z[l])
            grad_a = None
            if delta is None:
                continue
            if ctx.call is not None:
                _see_layer(ctx, l, delta, a[l])
            # ∂J/∂W(l) = δ(l+1)ᵀ a(l),  ∂J/∂b(l) = Σₙ δ(l+1)
            grads[2 * l], grads[2 * l + 1] = weight_and_bias_grads(delta, a[l], need[2 * l], need[2 * l + 1])
            if l > ctx.lowest or need_a0:
                grad_a = delta.mm(W[l]) if ctx.carry is None else ctx.carry(l, delta, W[l])  # ∂J/∂a(l) = δ(l+1) W(l)
        grad_input = grad_a.reshape(ctx.input_shape) if need_a0 and grad_a is not None else None
        return grad_input, None, *grads


def _see_layer(ctx, l: int, delta: torch.Tensor, a: torch.Tensor) -> None:
    """Report layer l to `observe` as if it were a Linear: δ of z(l+1), a(l), with the leading dimensions back."""
    W, b = ctx.params[2 * l], ctx.params[2 * l + 1]
    leading = ctx.input_shape[:-1]
    z = F.linear(a, W, b) if ctx.call.keep_output else None  # z(l+1) is not kept for every σ': recompute
    delta, a, z = (t if t is None else t.reshape(*leading, t.shape[-1]) for t in (delta, a, z))
    ctx.call.see(linear_seen(ctx.call, delta, a, W, b, output=z, layer=f"layers.{l}"))


def native_operator():
    """The native twin of `MLP` (`_native`: csrc/mlp.cpp, the same loop in C++) where it may run now, else None:
    built, not switched off, no torch.func transform or torch.compile tracing (they need the Python rule), and
    nobody watching (`observe` reads δ and a from the Python rule's loop). The one place that decides."""
    return _native.operator_now() if observe.current() is None else None


def mlp(a: torch.Tensor, layers: tuple, *weights_and_biases: torch.Tensor | None) -> torch.Tensor:
    """The network's output, `MLP.apply(a, layers, *weights_and_biases)[0]`: natively where `native_operator`
    allows and every activation has a native form (`_native.encode`), else by the Python rule."""
    op = native_operator()
    encoded = None if op is None else _native.encode(layers)  # (activation codes, their parameters), or None
    if encoded is not None:
        return op(a, weights_and_biases, *encoded)
    return apply_rule(MLP, a, layers, *weights_and_biases)[0]
