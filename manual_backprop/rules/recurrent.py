"""Recurrent layers: the notes' layer unrolled in time, the same W at every step t.

One layer and one direction of a plain RNN, in the notes' notation (torch's layout: x W_ihᵀ):

    forward    z_t = W_ih x_t + b_ih + W_hh h_{t−1} + b_hh,     h_t = σ(z_t)            t = 1 … T
    backward   δh_t = ∂J/∂h_t from above (the layer output's gradient at t) + W_hhᵀ δz_{t+1}
               δz_t = δh_t ⊙ σ'(z_t)                        σ' from the saved h_t: tanh 1 − h², relu [h > 0]
               δx_t = W_ihᵀ δz_t,      δh_0 = W_hhᵀ δz_1     (∂J/∂h0: the initial state's gradient)
    weights    ∂J/∂W_ih = Σ_t Σ_n δz_t x_tᵀ,   ∂J/∂W_hh = Σ_t Σ_n δz_t h_{t−1}ᵀ,   ∂J/∂b_ih = ∂J/∂b_hh = Σ_t Σ_n δz_t

so every weight gradient is the notes' outer product summed over time as well as over the batch,
and δ runs backward through time by the notes' recursion, W_hhᵀ δ in place of W(l)ᵀ δ(l+1).

LSTM (torch's gate order i, f, g, o; z_t = (z_i, z_f, z_g, z_o) as above, 4H rows of W):

    i, f, o = sigmoid(z_i, z_f, z_o),  g = tanh(z_g),  c_t = f ⊙ c_{t−1} + i ⊙ g,  m_t = o ⊙ tanh(c_t)
    h_t = m_t  (or h_t = W_hr m_t with proj_size)
    δm_t = δh_t  (or W_hrᵀ δh_t, and ∂J/∂W_hr = Σ_t Σ_n δh_t m_tᵀ)
    δc_t = δc from step t+1 + δm_t ⊙ o ⊙ (1 − tanh²(c_t))
    δz_t = (δc_t ⊙ g ⊙ σ'(z_i),  δc_t ⊙ c_{t−1} ⊙ σ'(z_f),  δc_t ⊙ i ⊙ tanh'(z_g),  δm_t ⊙ tanh(c_t) ⊙ σ'(z_o))
    δc_{t−1} = δc_t ⊙ f,   δh_{t−1} = W_hhᵀ δz_t,  and the weight sums above.

GRU (gates r, u = torch's z, n; the hidden part of n is gated, so W_ih and W_hh see different δs):

    r, u = sigmoid(z^x_{r,u} + z^h_{r,u}),  n = tanh(z^x_n + r ⊙ z^h_n),  h_t = (1 − u) ⊙ n + u ⊙ h_{t−1}
    δn = δh_t ⊙ (1 − u) ⊙ (1 − n²),  δu = δh_t ⊙ (h_{t−1} − n) ⊙ σ'(u),  δr = δn ⊙ z^h_n ⊙ σ'(r)
    δz^x_t = (δr, δu, δn),   δz^h_t = (δr, δu, r ⊙ δn),   δh_{t−1} = u ⊙ δh_t + W_hhᵀ δz^h_t
    ∂J/∂W_ih = Σ_t Σ_n δz^x_t x_tᵀ,   ∂J/∂W_hh = Σ_t Σ_n δz^h_t h_{t−1}ᵀ

Layout. Each rule runs one layer in one direction over packed rows: step t owns rows
[offset_t, offset_t + B_t) of x (Σ_t B_t, in), B_t sequences still running at t, longest first
(torch's PackedSequence; a padded (T, N, in) input is the case B_t = N). A sequence's state stops
changing after its last step, and δ past its end is zero, so its final state and δh0 come out
right. `reverse` runs t = T … 1, each sequence starting from h0 at its own last step. x W_ihᵀ
and the weight sums run once over all steps; only δh_{t−1} = δz_t W_hh stays in the loop.
Every rule takes, after its tensors: batch_sizes (B_t per step), reverse, name (the parameters'
suffix, "_l0", "_l1_reverse"; "" for a cell: how `observe` names what it sees) and feedback.

The loop over time itself is `PythonLoops` below (the readable reference, and what double backward,
torch.func and torch.compile differentiate or trace); on CPU in float32/64 the LSTM's and GRU's run
natively (`csrc/recurrent.cpp`, same signatures; `loops` decides).

A learning rule (`plugins.feedback_alignment`) passes `feedback`, a B for each of W_ih, W_hh (W_hr):
δ then travels through B where backprop has W (δx_t = Bᵀ_ih δz_t, δh_{t−1} = Bᵀ_hh δz_t), the weight
sums unchanged. None: backprop.

Saved: x, h0 (c0), the weights, and the outputs h_t with what σ' needs (LSTM: gates i, f, g, o
and c_t; GRU: r, u, n and z^h_n). The gates and cells are returned as extra outputs (the
caller keeps the first two or three) so that double backward reaches W through σ' (see rules.mlp).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch
import torch.nn.functional as F

from manual_backprop import observe
from manual_backprop._amp import without_autocast
from manual_backprop.rules import _native_recurrent
from manual_backprop.rules.linear import linear_seen, weight_and_bias_grads


def steps(batch_sizes: tuple, reverse: bool) -> list:
    """(t, first row, B_t) for each step, in the order the forward recursion runs."""
    offsets = list(itertools.accumulate(batch_sizes, initial=0))
    order = reversed(range(len(batch_sizes))) if reverse else range(len(batch_sizes))
    return [(t, offsets[t], batch_sizes[t]) for t in order]


def previous(seq: torch.Tensor, init: torch.Tensor, batch_sizes: tuple, reverse: bool) -> torch.Tensor:
    """The state each row's step started from (h_{t−1}; h_{t+1} reversed), row for row with `seq`;
    a sequence's first step starts from its row of `init`."""
    N = init.shape[0]
    if all(B == N for B in batch_sizes):
        return torch.cat((seq[N:], init)) if reverse else torch.cat((init, seq[:-N]))
    offsets, T, pieces = list(itertools.accumulate(batch_sizes, initial=0)), len(batch_sizes), []
    for t, B in enumerate(batch_sizes):
        if not reverse:
            pieces.append(init[:B] if t == 0 else seq[offsets[t - 1] : offsets[t - 1] + B])
        elif t == T - 1:
            pieces.append(init[:B])
        else:  # the sequences that ran at t+1, then those whose last step is t
            after = batch_sizes[t + 1]
            pieces += [seq[offsets[t + 1] : offsets[t + 1] + after], init[after:B]]
    return torch.cat(pieces)


def _carry(new: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The full (N, H) state after a step that updated its first B rows to `new`."""
    return new if new.shape[0] == state.shape[0] else torch.cat((new, state[new.shape[0] :]))


def _input_part(x, W_ih, b_ih, b_hh):
    """x_t W_ihᵀ + b_ih + b_hh for every step at once: what of z_t does not wait for h_{t−1}. The two
    biases are added once, as one (4H,) vector, not as a second pass over every step's rows."""
    return F.linear(x, W_ih, _plus(b_ih, b_hh))


def _plus(x, y):
    return y if x is None else x if y is None else x + y


def _rows(t, start: int, B: int):
    return None if t is None else t[start : start + B]


class RNNLayer(torch.autograd.Function):
    """h_t = σ(x_t W_ihᵀ + b_ih + h_{t−1} W_hhᵀ + b_hh), σ = tanh or relu. Returns (h packed, h_n)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, h0, W_ih, W_hh, b_ih, b_hh, relu, batch_sizes, reverse, name, feedback):
        zx, h, out = _input_part(x, W_ih, b_ih, b_hh), h0, [None] * len(batch_sizes)
        for t, start, B in steps(batch_sizes, reverse):
            z = torch.addmm(zx[start : start + B], h[:B], W_hh.T)
            out[t] = z.relu() if relu else z.tanh()
            h = _carry(out[t], h)
        return torch.cat(out), h

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        x, h0, W_ih, W_hh, b_ih, b_hh, ctx.relu, ctx.batch_sizes, ctx.reverse, ctx.suffix, ctx.feedback = inputs
        ctx.set_materialize_grads(False)
        ctx.call = observe.keep(ctx, W_ih, b_ih, W_hh, b_hh)
        ctx.save_for_backward(x, h0, W_ih, W_hh, outputs[0])

    @staticmethod
    @without_autocast
    def backward(ctx, delta_out, delta_hn):
        x, h0, W_ih, W_hh, a, delta_out, delta_hn = in_float32(*ctx.saved_tensors, delta_out, delta_hn)
        W_ih, W_hh = transport(ctx, W_ih, W_hh)
        sigma_prime = (a > 0).to(a.dtype) if ctx.relu else 1 - a * a
        delta_h, delta_z = _plus(delta_hn, h0.new_zeros(h0.shape)), [None] * len(ctx.batch_sizes)
        for t, start, B in reversed(steps(ctx.batch_sizes, ctx.reverse)):
            delta_h_t = _plus(_rows(delta_out, start, B), delta_h[:B])
            delta_z[t] = delta_h_t * sigma_prime[start : start + B]  # δz_t = δh_t ⊙ σ'(z_t)
            delta_h = _carry(delta_z[t] @ W_hh, delta_h)  # δh_{t−1} = W_hhᵀ δz_t
        delta_z = torch.cat(delta_z)
        h_prev = previous(a, h0, ctx.batch_sizes, ctx.reverse)
        return _input_and_weight_grads(ctx, ctx.needs_input_grad[:6], delta_z, delta_z, x, h_prev, W_ih, delta_h) + (None,) * 5


LOWER_PRECISION = (torch.bfloat16, torch.float16)


def in_float32(*tensors) -> tuple:
    """The tensors, those in a lower precision (what autocast ran forward in) as float32: backward runs its
    δ recursion and sums Σ_t Σ_n in float32, as oneDNN's LSTM does inside; autograd casts each gradient back
    to its input's dtype. Float32 and float64 pass through untouched."""
    return tuple(t.float() if t is not None and t.dtype in LOWER_PRECISION else t for t in tensors)


def transport(ctx, *Ws) -> tuple:
    """The matrices δ travels back through: the weights themselves (backprop), or the B a learning rule put
    in their place, one per weight (`feedback`: feedback alignment's fixed B, sign symmetry's sign(W), …)."""
    if ctx.feedback is None:
        return Ws
    return in_float32(*ctx.feedback) + (None,) * (len(Ws) - len(ctx.feedback))  # no W_hr: no B_hr


def _input_and_weight_grads(ctx, needs, delta_zx, delta_zh, x, h_prev, W_ih, delta_h0) -> tuple:
    """(∂J/∂x, ∂J/∂h0, ∂J/∂W_ih, ∂J/∂W_hh, ∂J/∂b_ih, ∂J/∂b_hh) from the δz of every step at once:
    ∂J/∂x = δz^x W_ih, ∂J/∂W_ih = Σ δz^x xᵀ, ∂J/∂W_hh = Σ δz^h h_{t−1}ᵀ; reported to `observe` if watched."""
    need_x, need_h0, need_W_ih, need_W_hh, need_b_ih, need_b_hh = needs  # which of them autograd asks for
    # under autocast a layer's input (the layer below's projected h) may be in the lower precision, δ not
    x, h_prev = x.to(delta_zx.dtype), h_prev.to(delta_zh.dtype)
    if ctx.call is not None:
        see(ctx, delta_zx, x, *ctx.params[:2], "ih")
        see(ctx, delta_zh, h_prev, *ctx.params[2:4], "hh")
        # book-keeping DP-SGD forms them clipped (`keep`'s order: W_ih, b_ih, W_hh, b_hh)
        need_W_ih, need_b_ih, need_W_hh, need_b_hh = observe.needs(ctx, need_W_ih, need_b_ih, need_W_hh, need_b_hh)
    grad_x = delta_zx @ W_ih if need_x else None
    # RNN, LSTM: one δz, so ∂J/∂[W_ih | W_hh] = Σ δz [x | h_{t−1}]ᵀ, one product (~10% faster than two half as wide)
    both = delta_zh is delta_zx and need_W_ih and need_W_hh
    grad_W_ih, grad_b_ih = weight_and_bias_grads(delta_zx, torch.cat((x, h_prev), 1) if both else x, need_W_ih, need_b_ih)
    shared = delta_zh is delta_zx and grad_b_ih is not None  # and Σ δz once for both biases
    grad_W_hh, grad_b_hh = weight_and_bias_grads(delta_zh, h_prev, need_W_hh and not both, need_b_hh and not shared)
    if both:
        grad_W_ih, grad_W_hh = grad_W_ih.split((x.shape[1], h_prev.shape[1]), 1)
    if shared and need_b_hh:
        grad_b_hh = grad_b_ih.clone()
    return grad_x, (delta_h0 if need_h0 else None), grad_W_ih, grad_W_hh, grad_b_ih, grad_b_hh


def see(ctx, delta, a, W, b, kind: str) -> None:
    """Report one weight of this layer and direction to `observe` as a Linear over (T, N, ·) (samples on
    dim 1), named like its parameter: "ih_l0", "hh_l0_reverse", "hr_l1". Its output, if an observer asks
    (the tape's keep="output"), is that Linear's z = a Wᵀ + b (x W_ihᵀ + b_ih, h_{t−1} W_hhᵀ + b_hh, W_hr m_t),
    formed again here from the saved a rather than kept from forward for every step."""
    rows = (ctx.batch_sizes, ctx.call.packed_order)
    z = padded(F.linear(a.to(W.dtype), W, b), *rows) if ctx.call.keep_output else None
    seen = linear_seen(ctx.call, padded(delta, *rows), padded(a, *rows), W, b, output=z, layer=kind + ctx.suffix)
    ctx.call.see(replace(seen, batch_dim=1))


def padded(packed: torch.Tensor, batch_sizes: tuple, order: torch.Tensor | None = None) -> torch.Tensor:
    """Packed rows (Σ_t B_t, ·) laid out as (T, N, ·), zero past each sequence's end, sample order[n] at
    the packed position n (order: the PackedSequence's sorted_indices; None: as packed). Zero rows add
    nothing to Σ_t δ_t a_tᵀ, so sample n's sum runs over its own steps."""
    T, N = len(batch_sizes), batch_sizes[0]
    if order is None and all(B == N for B in batch_sizes):
        return packed.view(T, N, -1)
    sample = torch.arange(N, device=packed.device) if order is None else order.to(packed.device)
    index = torch.cat([t * N + sample[:B] for t, B in enumerate(batch_sizes)])
    return packed.new_zeros(T * N, packed.shape[1]).index_copy_(0, index, packed).view(T, N, -1)


class LSTMLayer(torch.autograd.Function):
    """c_t = f ⊙ c_{t−1} + i ⊙ g, h_t = o ⊙ tanh(c_t) (W_hr-projected with proj_size).

    Returns (h packed, h_n, c_n, gates i|f|g|o packed, c packed); callers keep the first three."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, batch_sizes, reverse, name, feedback):
        if c0.dtype in LOWER_PRECISION and x.dtype == c0.dtype:  # all of it in bfloat16 (autocast's lstm)
            return _lstm_in_float32(x, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, batch_sizes, reverse)
        return loops(x).lstm_forward(x, W_ih, _plus(b_ih, b_hh), h0, c0, W_hh, W_hr, batch_sizes, reverse)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        x, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, ctx.batch_sizes, ctx.reverse, ctx.suffix, ctx.feedback = inputs
        ctx.set_materialize_grads(False)
        ctx.call = observe.keep(ctx, W_ih, b_ih, W_hh, b_hh, W_hr)
        out, _, _, gates, cells = outputs
        ctx.save_for_backward(x, h0, c0, W_ih, W_hh, W_hr, out, gates, cells)

    @staticmethod
    @without_autocast
    def backward(ctx, delta_out, delta_hn, delta_cn, grad_gates, grad_cells):
        saved = in_float32(*ctx.saved_tensors, delta_out, delta_hn, delta_cn)
        x, h0, c0, W_ih, W_hh, W_hr, out, a, cells, delta_out, delta_hn, delta_cn = saved
        B_ih, B_hh, B_hr = transport(ctx, W_ih, W_hh, W_hr)
        delta_hn, delta_cn = _plus(delta_hn, h0.new_zeros(h0.shape)), _plus(delta_cn, c0.new_zeros(c0.shape))
        extra = () if grad_gates is None and grad_cells is None else (grad_gates, grad_cells)
        delta_z, delta_hs, delta_h, delta_c = loops(a, double=bool(extra)).lstm_backward(
            delta_out, delta_hn, delta_cn, a, cells, c0, B_hh, B_hr, ctx.batch_sizes, ctx.reverse, *extra)
        h_prev = previous(out, h0, ctx.batch_sizes, ctx.reverse)
        needs = ctx.needs_input_grad
        grads = _input_and_weight_grads(ctx, needs[:2] + needs[3:7], delta_z, delta_z, x, h_prev, B_ih, delta_h)
        grad_W_hr = None
        if W_hr is not None and (ctx.needs_input_grad[7] or ctx.call is not None):
            m = (a[:, 3 * c0.shape[1] :] * cells.tanh()).to(delta_hs.dtype)  # m_t = o ⊙ tanh(c_t)
            if ctx.call is not None:
                see(ctx, delta_hs, m, W_hr, None, "hr")
            if observe.needs(ctx, *[True] * 4, True)[4]:  # W_hr is `keep`'s fifth; book-keeping forms it clipped
                grad_W_hr = delta_hs.T @ m  # ∂J/∂W_hr = Σ_t Σ_n δh_t m_tᵀ
        grad_x, grad_h0, grad_W_ih, grad_W_hh, grad_b_ih, grad_b_hh = grads
        grad_c0 = delta_c if ctx.needs_input_grad[2] else None
        return grad_x, grad_h0, grad_c0, grad_W_ih, grad_W_hh, grad_b_ih, grad_b_hh, grad_W_hr, None, None, None, None


def _lstm_in_float32(x, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, batch_sizes, reverse):
    """LSTMLayer's forward on inputs all in a lower precision, as oneDNN's LSTM runs it: the low-precision
    values' products summed, the gates and c updated, in float32; h and the final states rounded back. The
    gates and cells stay float32 for backward (which `in_float32` runs in float32 too)."""
    low = x.dtype
    x, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr = in_float32(x, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr)
    with torch.autocast(x.device.type, enabled=False):
        out, h_n, c_n, gates, cells = loops(x).lstm_forward(x, W_ih, _plus(b_ih, b_hh), h0, c0, W_hh, W_hr,
                                                            batch_sizes, reverse)
    return out.to(low), h_n.to(low), c_n.to(low), gates, cells


class GRULayer(torch.autograd.Function):
    """h_t = (1 − u) ⊙ n + u ⊙ h_{t−1}, n = tanh(z^x_n + r ⊙ z^h_n).

    Returns (h packed, h_n, r|u|n|z^h_n packed); callers keep the first two."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, h0, W_ih, W_hh, b_ih, b_hh, batch_sizes, reverse, name, feedback):
        zx = F.linear(x, W_ih, b_ih)
        return loops(zx).gru_forward(zx, h0, W_hh, b_hh, batch_sizes, reverse)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        x, h0, W_ih, W_hh, b_ih, b_hh, ctx.batch_sizes, ctx.reverse, ctx.suffix, ctx.feedback = inputs
        ctx.set_materialize_grads(False)
        ctx.call = observe.keep(ctx, W_ih, b_ih, W_hh, b_hh)
        ctx.save_for_backward(x, h0, W_ih, W_hh, outputs[0], outputs[2])

    @staticmethod
    @without_autocast
    def backward(ctx, delta_out, delta_hn, grad_kept):
        x, h0, W_ih, W_hh, out, kept, delta_out, delta_hn = in_float32(*ctx.saved_tensors, delta_out, delta_hn)
        B_ih, B_hh = transport(ctx, W_ih, W_hh)
        h_prev = previous(out, h0, ctx.batch_sizes, ctx.reverse)
        extra = () if grad_kept is None else (grad_kept,)
        delta_zx, delta_zh, delta_h = loops(kept, double=bool(extra)).gru_backward(
            delta_out, _plus(delta_hn, h0.new_zeros(h0.shape)), kept, h_prev, B_hh, ctx.batch_sizes, ctx.reverse, *extra)
        grads = _input_and_weight_grads(ctx, ctx.needs_input_grad[:6], delta_zx, delta_zh, x, h_prev, B_ih, delta_h)
        return grads + (None,) * 4


# ------------------------------------------------------------------ the loops over time
#
# One pass of the recursion, forward or backward, over every step: Python here (the reference, and what
# double backward and torch.func differentiate), C++ in csrc/recurrent.cpp with the same signatures.


def loops(*tensors, double: bool = False):
    """Where the loops over time run: the native ones (`_native_recurrent`) where they may (CPU, float32/64,
    no transform or tracing, not under autocast, and not a backward that double backward differentiates), else
    these (under autocast their products take autocast's dtype, as torch's do)."""
    if double or torch.is_grad_enabled() or torch.is_autocast_enabled(tensors[0].device.type):
        return PythonLoops
    return _native_recurrent.loops_now(*tensors) or PythonLoops


class PythonLoops:
    """The loops over time in Python: the reference the native ones (csrc/recurrent.cpp) are tested against."""

    @staticmethod
    def lstm_forward(x, W_ih, b, h0, c0, W_hh, W_hr, batch_sizes, reverse):
        """(h packed, h_n, c_n, gates packed, c packed); b = b_ih + b_hh."""
        zx = F.linear(x, W_ih, b)  # what of z_t does not wait for h_{t−1}, every step at once
        H, h, c, T = c0.shape[1], h0, c0, len(batch_sizes)
        out, gates, cells = [None] * T, [None] * T, [None] * T
        for t, start, B in steps(batch_sizes, reverse):
            z = torch.addmm(zx[start : start + B], h[:B], W_hh.T)
            a = z.sigmoid()
            a[:, 2 * H : 3 * H] = z[:, 2 * H : 3 * H].tanh()
            i, f, g, o = a.chunk(4, 1)
            cells[t] = f * c[:B] + i * g
            m = o * cells[t].tanh()
            out[t], gates[t] = (m if W_hr is None else F.linear(m, W_hr)), a
            h, c = _carry(out[t], h), _carry(cells[t], c)
        return torch.cat(out), h, c, torch.cat(gates), torch.cat(cells)

    @staticmethod
    def lstm_backward(delta_out, delta_hn, delta_cn, a, cells, c0, B_hh, B_hr, batch_sizes, reverse,
                      grad_gates=None, grad_cells=None):
        """(δz packed, δh packed, δh0, δc0); grad_gates, grad_cells: what reached the gates and cells directly."""
        H, c_prev = cells.shape[1], previous(cells, c0, batch_sizes, reverse)
        i, f, g, o = a.chunk(4, 1)
        tanh_c = cells.tanh()
        sigma_prime = a * (1 - a)  # sigmoid' for i, f, o; tanh' for g:
        sigma_prime[:, 2 * H : 3 * H] = 1 - g * g
        partner = torch.cat((g, c_prev, i, tanh_c), 1)  # ∂z-gate's product partner: δgate = δc ⊙ partner
        dc_dm = o * (1 - tanh_c * tanh_c)  # ∂c_t/∂m_t through m = o ⊙ tanh(c)
        delta_h, delta_c = delta_hn, delta_cn
        delta_z, delta_hs = [None] * len(batch_sizes), [None] * len(batch_sizes)
        for t, start, B in reversed(steps(batch_sizes, reverse)):
            delta_hs[t] = _plus(_rows(delta_out, start, B), delta_h[:B])
            delta_m = delta_hs[t] if B_hr is None else delta_hs[t] @ B_hr
            dc = _plus(delta_c[:B] + delta_m * dc_dm[start : start + B], _rows(grad_cells, start, B))
            delta_gate = torch.cat((dc, dc, dc, delta_m), 1) * partner[start : start + B]
            delta_z[t] = _plus(delta_gate, _rows(grad_gates, start, B)) * sigma_prime[start : start + B]
            delta_c = _carry(dc * f[start : start + B], delta_c)  # δc_{t−1} = δc_t ⊙ f
            delta_h = _carry(delta_z[t] @ B_hh, delta_h)  # δh_{t−1} = W_hhᵀ δz_t
        return torch.cat(delta_z), torch.cat(delta_hs), delta_h, delta_c

    @staticmethod
    def gru_forward(zx, h0, W_hh, b_hh, batch_sizes, reverse):
        """(h packed, h_n, r|u|n|z^h_n packed) from zx = x W_ihᵀ + b_ih of every step."""
        H, h, T = h0.shape[1], h0, len(batch_sizes)
        out, kept = [None] * T, [None] * T
        for t, start, B in steps(batch_sizes, reverse):
            zh = F.linear(h[:B], W_hh, b_hh)
            ru = (zx[start : start + B, : 2 * H] + zh[:, : 2 * H]).sigmoid()
            zh_n = zh[:, 2 * H :]
            n = (zx[start : start + B, 2 * H :] + ru[:, :H] * zh_n).tanh()
            out[t] = n + ru[:, H:] * (h[:B] - n)
            kept[t] = torch.cat((ru, n, zh_n), 1)
            h = _carry(out[t], h)
        return torch.cat(out), h, torch.cat(kept)

    @staticmethod
    def gru_backward(delta_out, delta_hn, kept, h_prev, B_hh, batch_sizes, reverse, grad_kept=None):
        """(δz^x packed, δz^h packed, δh0); grad_kept: what reached r, u, n or z^h_n directly."""
        r, u, n, zh_n = kept.chunk(4, 1)
        d_n = (1 - u) * (1 - n * n)  # ∂h_t/∂(n's pre-activation)
        d_u = (h_prev - n) * u * (1 - u)  # ∂h_t/∂(u's pre-activation)
        sigma_prime_r, sigma_prime_n = r * (1 - r), 1 - n * n
        if grad_kept is not None:  # double backward: gradients that reached r, u, n or z^h_n directly
            g_r, g_u, g_n, g_zh_n = grad_kept.chunk(4, 1)
        delta_h = delta_hn
        delta_zx, delta_zh = [None] * len(batch_sizes), [None] * len(batch_sizes)
        for t, start, B in reversed(steps(batch_sizes, reverse)):
            rows = slice(start, start + B)
            delta_h_t = _plus(_rows(delta_out, start, B), delta_h[:B])
            delta_n = delta_h_t * d_n[rows]
            delta_u = delta_h_t * d_u[rows]
            if grad_kept is not None:
                delta_n = delta_n + g_n[rows] * sigma_prime_n[rows]
                delta_u = delta_u + g_u[rows] * u[rows] * (1 - u[rows])
            delta_r = delta_n * zh_n[rows]
            if grad_kept is not None:
                delta_r = delta_r + g_r[rows]
            delta_r = delta_r * sigma_prime_r[rows]
            delta_zh_n = delta_n * r[rows] if grad_kept is None else delta_n * r[rows] + g_zh_n[rows]
            delta_zx[t] = torch.cat((delta_r, delta_u, delta_n), 1)
            delta_zh[t] = torch.cat((delta_r, delta_u, delta_zh_n), 1)
            delta_h = _carry(delta_h_t * u[rows] + delta_zh[t] @ B_hh, delta_h)  # δh_{t−1} = u ⊙ δh_t + W_hhᵀ δz^h_t
        return torch.cat(delta_zx), torch.cat(delta_zh), delta_h
