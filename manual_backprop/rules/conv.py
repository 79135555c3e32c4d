"""Convolution: the notes' Linear layer applied to every patch of the input, with shared weights.

    z = W ⋆ a + b               each output position: W · patch(a) + b
    ∂J/∂a = Wᵀ δ                summed back over the patches each input element belongs to:
                                the transposed convolution of δ with W
    ∂J/∂W = Σₙ Σ_positions δ ⊗ patch(a)
                                the notes' outer products δ aᵀ, one per output position
    ∂J/∂b = Σₙ Σ_positions δ

Shapes (torch's layout, d = 1, 2 or 3 spatial dimensions, G groups):
    a: (N, C_in, *in)    W: (C_out, C_in/G, *k)    b: (C_out,)    z, δ: (N, C_out, *out)
One implementation serves every d. A transposed convolution is the same algebra read the
other way: its forward is a convolution's ∂J/∂a, so its ∂J/∂a is a convolution and its
∂J/∂W is a convolution's ∂J/∂W with δ and a trading places. Padding modes other than
zeros pad first (`Pad`, whose backward adds each copied element's δ back to its source)
and convolve with padding 0, as torch does.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from manual_backprop import observe
from manual_backprop._amp import without_autocast
from manual_backprop.rules.linear import per_sample_linear_sq_norms


def _unbatched(a: torch.Tensor, W: torch.Tensor) -> bool:
    return a.dim() == W.dim() - 1  # (C, *in) rather than (N, C, *in)


def _narrow_to(t: torch.Tensor, size) -> torch.Tensor:
    """Cut the trailing spatial dimensions of `t` down to `size` (a no-op where they already match)."""
    d = len(size)
    for i, n in enumerate(size):
        dim = t.dim() - d + i
        if t.shape[dim] != n:
            t = t.narrow(dim, 0, n)
    return t


def transposed_convolution(delta, W, size, stride, padding, dilation, groups):
    """∂J/∂a = Wᵀ δ: the transposed convolution of δ with W, sized back to the input's spatial `size`.

    A convolution maps sizes many to one (stride s drops up to s − 1 trailing elements);
    output_padding picks the input's size among them.
    """
    kernel = W.shape[2:]
    natural = [(o - 1) * s - 2 * p + dil * (k - 1) + 1
               for o, s, p, dil, k in zip(delta.shape[2:], stride, padding, dilation, kernel)]
    output_padding = [n - m for n, m in zip(size, natural)]
    return torch.convolution(delta, W, None, stride, padding, dilation, True, output_padding, groups)


def conv_weight_grad(delta, a, kernel_size, stride, padding, dilation, groups):
    """∂J/∂W = Σₙ Σ_positions δ ⊗ patch(a), summed over the batch: shape (C_out, C_in/G, *k).

    delta: (N, C_out, *out), a: (N, C_in, *in). In general one convolution of a with δ,
    batch and channel axes swapped: the batch becomes the channels the convolution sums
    over, δ becomes the kernel, and stride and dilation trade places; the result can be a
    few positions larger than the kernel where stride drops trailing input, and those are
    cut. The same sum is written two more ways for the shapes where they measured faster on
    this project's CPU: one matrix product of δ with the patches (1×1 kernels, and δ with one
    or two positions), and one kernel tap at a time (depthwise, many positions). Every form
    serves 1-, 2- and 3-d alike, with groups, stride, padding and dilation.

    Accuracy in float32: small sums are formed in float64 (`_sum_in_float64`). A 3-d
    convolution with the batch as its channels sums in an order whose float32 error measured
    3.4–8.8× torch's (2–8 samples, 3×3×3 kernels, 6³–8³ maps); one sample at a time, summed,
    measured 0.2–1.8× torch's, and at 16³ faster (5.8 against 7.2 ms).
    """
    N, C_in, *size = a.shape
    C_out, G = delta.shape[1], groups
    W_shape = (C_out, C_in // G, *kernel_size)
    if N == 0:
        return delta.new_zeros(W_shape)
    positions = math.prod(delta.shape[2:])
    if _sum_in_float64(delta, N * positions * C_out * (C_in // G) * math.prod(kernel_size)):
        return conv_weight_grad(delta.double(), a.double(), kernel_size, stride, padding, dilation, groups).to(delta.dtype)
    if positions <= 2 or math.prod(kernel_size) == 1:
        return _weight_grad_by_patches(delta, a, kernel_size, stride, padding, dilation, groups)
    if G == C_in == C_out and positions >= 64:
        return _depthwise_weight_grad(delta, a, kernel_size, stride, padding, dilation)
    if len(size) == 3 and N > 1:  # one sample at a time, summed: see the docstring
        return sum(conv_weight_grad(delta[n : n + 1], a[n : n + 1], kernel_size, stride, padding, dilation, groups)
                   for n in range(N))
    if G == 1:
        a_t = a.transpose(0, 1)  # (C_in, N, *in): the batch is now the channel axis
    else:  # (C_in/G, G·N, *in): group g's batch occupies channels g·N … (g+1)·N − 1
        a_t = a.reshape(N, G, C_in // G, *size).permute(2, 1, 0, *range(3, 3 + len(size))).reshape(C_in // G, G * N, *size)
    delta_t = delta.transpose(0, 1)  # (C_out, N, *out): δ as the kernel
    grad_W = torch.convolution(a_t, delta_t, None, dilation, padding, stride, False, [0] * len(size), G)
    return _narrow_to(grad_W.transpose(0, 1), kernel_size)  # (C_out, C_in/G, *k)


EXACT_BELOW = 2**17  # multiply-adds


def _sum_in_float64(delta, multiply_adds: int) -> bool:
    """Whether a weight gradient in a narrower float is summed in float64 and rounded once.

    Each element of ∂J/∂W is a sum of N·positions products; in float32 its error depends on the
    order the kernel adds them in, and the convolution below adds them in another order than
    torch's backward kernel: on torch's own test convolutions (common_modules: 2 samples, 4 → 5
    channels, kernel 3) its error was up to 2.5× torch's (4.6× with a ramp for δ). Summed in float64 and rounded once, every
    element is within half a float32 ulp of the exact sum, as close as any float32 order can be.
    Below EXACT_BELOW multiply-adds the float64 sum costs microseconds (per-call overhead
    dominates there); above it the float32 convolution is kept for speed, and at those sizes
    its longer sums measured as accurate as torch's or better (tests/test_conv.py)."""
    return (delta.dtype in (torch.float32, torch.float16, torch.bfloat16) and multiply_adds <= EXACT_BELOW
            and delta.device.type in ("cpu", "cuda"))


def patches(a, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """(N, C, *out, *k): the patch of the zero-padded a under each output position (a strided view)."""
    a = F.pad(a, [x for p in reversed(padding) for x in (p, p)])
    for j, (k, s, d) in enumerate(zip(kernel_size, stride, dilation)):
        a = a.unfold(2 + j, d * (k - 1) + 1, s)  # appends this dimension's window
    if any(d > 1 for d in dilation):
        a = a[(..., *(slice(None, None, d) for d in dilation))]
    return a


def _weight_grad_by_patches(delta, a, kernel_size, stride, padding, dilation, groups):
    """The same sum as one matrix product per group, δ (C_out/G × N·positions) times the patches
    (N·positions × C_in/G·k): the notes' δ aᵀ with a = patch(a). Used for 1×1 kernels (a Linear
    layer at every position) and where δ has one or two positions (resnet18's last stage at 32×32):
    there it beats the convolution above several times; elsewhere copying the patches costs more."""
    N, C_in = a.shape[:2]
    C_out, G, K = delta.shape[1], groups, math.prod(kernel_size)
    P = patches(a, kernel_size, stride, padding, dilation).reshape(N, G, C_in // G, -1, K)  # (N, G, c, L, K)
    P = P.permute(1, 0, 3, 2, 4).reshape(G, -1, C_in // G * K)  # (G, N·L, c·K)
    D = delta.reshape(N, G, C_out // G, -1).permute(1, 2, 0, 3).reshape(G, C_out // G, -1)  # (G, o, N·L)
    return (D @ P).reshape(C_out, C_in // G, *kernel_size)


def _depthwise_weight_grad(delta, a, kernel_size, stride, padding, dilation):
    """The same sum for a depthwise convolution (one input channel per output channel), one kernel
    tap at a time: ∂J/∂W[c, tap] = Σₙ Σ_positions δ[n, c, pos] · a[n, c, pos·s + tap·dilation].

    torch runs the grouped convolution above as one small convolution per channel when δ, the
    kernel, is large; this loop over the k taps (9 for 3×3, never over elements) is several times
    faster there (measured on this project's CPU at mobilenet_v3_small sizes).
    """
    a = F.pad(a, [x for p in reversed(padding) for x in (p, p)])
    out, spatial = delta.shape[2:], list(range(2, delta.dim()))
    grads = []
    for tap in itertools.product(*(range(k) for k in kernel_size)):
        window = (..., *(slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(tap, dilation, stride, out)))
        grads.append((delta * a[window]).sum([0, *spatial]))
    return torch.stack(grads, 1).view(delta.shape[1], 1, *kernel_size)


def bias_grad(delta: torch.Tensor) -> torch.Tensor:
    """∂J/∂b = Σ δ over the batch and every position: (C_out,)."""
    return delta.sum([i for i in range(delta.dim()) if i != 1])



# ------------------------------------------------------------------ per sample (observe)


def _per_sample_rows(delta, a, kernel_size, stride, padding, dilation, groups):
    """Each sample's conv as Linear layers over its patches, one per group:
    δ as (N, G, L, C_out/G) and patch(a) as (N, G, L, C_in/G·k), L output positions."""
    N, C_in = a.shape[:2]
    C_out, G, K = delta.shape[1], groups, math.prod(kernel_size)
    P = patches(a, kernel_size, stride, padding, dilation).reshape(N, G, C_in // G, -1, K)
    P = P.permute(0, 1, 3, 2, 4).reshape(N, G, -1, C_in // G * K)
    D = delta.reshape(N, G, C_out // G, -1).transpose(2, 3)
    return D, P


def per_sample_conv_weight_grads(delta, a, kernel_size, stride, padding, dilation, groups):
    """Sample n's ∂J/∂W = Σ_positions δₙ ⊗ patch(aₙ): (N, C_out, C_in/G, *k) for δ: (N, C_out, *out),
    a: (N, C_in, *in): `conv_weight_grad` of each sample alone, vectorised over samples by torch.vmap
    (one grouped convolution with the samples as groups; no patches are copied).

    Measured against the Linear rule over unfolded patches (Opacus's way) on this project's shared
    2-core CPU, 3×3 kernels, alternating, median of 7: vmap 0.76× the time (1→16 channels, 28², N 64),
    0.72× (16→32, 26², stride 2), 0.94× (32→64, 16², N 32), 0.76× (3→32, 32²); and unfolding copies
    the input k times over."""
    def one(d, x):
        return conv_weight_grad(d.unsqueeze(0), x.unsqueeze(0), kernel_size, stride, padding, dilation, groups)

    return torch.vmap(one)(delta, a)


def per_sample_conv_weight_sq_norms(delta, a, kernel_size, stride, padding, dilation, groups, limit=2**24):
    """‖sample n's ∂J/∂W‖² without forming all N of them. Where the L output positions are few
    (L² ≤ C_out/G · C_in/G · k): ⟨δₙδₙᵀ, Pₙ Pₙᵀ⟩ from two L×L Gram matrices over the patches P
    (`per_sample_linear_sq_norms`, the Linear rule's identity with a = patch(a)); else each sample's
    gradient formed (`per_sample_conv_weight_grads`), a chunk of samples at a time so that at most
    `limit` elements are formed at once."""
    N, C_out, G = delta.shape[0], delta.shape[1], groups
    L, per_sample = math.prod(delta.shape[2:]), C_out * (a.shape[1] // G) * math.prod(kernel_size)
    if L * L * G <= per_sample:
        D, P = _per_sample_rows(delta, a, kernel_size, stride, padding, dilation, groups)
        return per_sample_linear_sq_norms(D.flatten(0, 1), P.flatten(0, 1), False).view(N, G).sum(1)
    chunk = max(1, limit // max(per_sample, 1))
    geometry = (kernel_size, stride, padding, dilation, groups)
    sq = [torch.linalg.vector_norm(per_sample_conv_weight_grads(d, x, *geometry).flatten(1), dim=1).square()
          for d, x in zip(delta.split(chunk), a.split(chunk))]
    return torch.cat(sq) if sq else delta.new_zeros(0)


def _per_sample_bias_grads(delta):
    """Sample n's ∂J/∂b = Σ_positions δₙ: (N, C_out)."""
    return delta.flatten(2).sum(2)


def conv_seen(call, delta, a, W, b, kernel_size, config, transposed: bool, output=None):
    """What a convolution rule reports to `observe`: δ and a (batched), and its per-sample functions.
    A transposed convolution's ∂J/∂W is a convolution's with δ and a trading places."""
    stride, padding, dilation, groups = config
    geometry = (kernel_size, stride, padding, dilation, groups)

    def ordered(d, x):  # (the conv's δ, the conv's a)
        return (x, d) if transposed else (d, x)

    def per_sample(d, x):
        return per_sample_conv_weight_grads(*ordered(d, x), *geometry), (None if b is None else _per_sample_bias_grads(d))

    def sq_norms(d, x):
        sq = per_sample_conv_weight_sq_norms(*ordered(d, x), *geometry)
        return sq if b is None else sq + _per_sample_bias_grads(d).square().sum(1)

    def grads(d, x):
        return conv_weight_grad(*ordered(d, x), *geometry), (None if b is None else bias_grad(d))

    return observe.Seen(call, delta, a, (W, b), per_sample=per_sample, sq_norms=sq_norms, output=output, grads=grads,
                        batch_dim=0)  # (N, C, *): a convolution's batch is dim 0 whatever the model's layout


def _save_for_weight_and_input_grads(ctx, a, W, b=None, output=None) -> None:
    """What both convolution rules keep: a only for ∂J/∂W (or while watched: `observe`), W only for
    ∂J/∂a, and the sizes to undo."""
    need_a, need_W = ctx.needs_input_grad[:2]
    ctx.unbatched = _unbatched(a, W)
    ctx.a_size, ctx.kernel_size = tuple(a.shape[2 - ctx.unbatched:]), tuple(W.shape[2:])
    ctx.call = observe.keep(ctx, W, b)
    ctx.save_for_backward(a if need_W or ctx.call else None, W if need_a else None, *observe.output(ctx, output))


def see_convolution(ctx, delta, a, output, transposed: bool) -> None:
    """Report to the watching call (δ and a already batched)."""
    output = [o.unsqueeze(0) if ctx.unbatched else o for o in output]
    ctx.call.see(conv_seen(ctx.call, delta, a, *ctx.params, ctx.kernel_size, ctx.config, transposed, *output))

class Convolution(torch.autograd.Function):
    """z = W ⋆ a + b, any number of spatial dimensions, stride, padding (per side, symmetric),
    dilation and groups.  a: (N, C_in, *in) or (C_in, *in); W: (C_out, C_in/G, *k).

        ∂J/∂a = Wᵀ δ                          transposed convolution of δ with W
        ∂J/∂W = Σₙ Σ_positions δ ⊗ patch(a)   `conv_weight_grad`
        ∂J/∂b = Σ δ

    Only the gradients autograd asks for are computed, and only what they need is saved
    (a for ∂J/∂W, W for ∂J/∂a).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, W, b, stride, padding, dilation, groups):
        unbatched = _unbatched(a, W)
        z = torch.convolution(a.unsqueeze(0) if unbatched else a, W, b, stride, padding, dilation, False,
                              [0] * len(stride), groups)
        return z.squeeze(0) if unbatched else z

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, W, b, *ctx.config = inputs
        _save_for_weight_and_input_grads(ctx, a, W, b, output)

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        a, W, *output = ctx.saved_tensors
        need_a, need_W, need_b = ctx.needs_input_grad[:3]
        stride, padding, dilation, groups = ctx.config
        if ctx.unbatched:
            delta, a = delta.unsqueeze(0), None if a is None else a.unsqueeze(0)
        if ctx.call is not None:
            see_convolution(ctx, delta, a, output, transposed=False)
            need_W, need_b = observe.needs(ctx, need_W, need_b)  # book-keeping DP-SGD forms them clipped
        grad_a = transposed_convolution(delta, W, ctx.a_size, stride, padding, dilation, groups) if need_a else None
        grad_W = conv_weight_grad(delta, a, ctx.kernel_size, stride, padding, dilation, groups) if need_W else None
        grad_b = bias_grad(delta) if need_b else None
        if ctx.unbatched and grad_a is not None:
            grad_a = grad_a.squeeze(0)
        return grad_a, grad_W, grad_b, None, None, None, None


class ConvTranspose(torch.autograd.Function):
    """z = Wᵀ ⋆ a + b: the transposed convolution, a convolution's ∂J/∂a used as a layer.
    a: (N, C_in, *in) or (C_in, *in); W: (C_in, C_out/G, *k).

    The same algebra read the other way (the convolution it transposes maps z's space to a's):
        ∂J/∂a = W ⋆ δ                          a convolution of δ with W
        ∂J/∂W = Σₙ Σ_positions a ⊗ patch(δ)    `conv_weight_grad` with δ and a trading places
        ∂J/∂b = Σ δ
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, W, b, stride, padding, output_padding, groups, dilation):
        unbatched = _unbatched(a, W)
        z = torch.convolution(a.unsqueeze(0) if unbatched else a, W, b, stride, padding, dilation, True,
                              output_padding, groups)
        return z.squeeze(0) if unbatched else z

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, W, b, stride, padding, _, groups, dilation = inputs
        ctx.config = stride, padding, dilation, groups
        _save_for_weight_and_input_grads(ctx, a, W, b, output)

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        a, W, *output = ctx.saved_tensors
        need_a, need_W, need_b = ctx.needs_input_grad[:3]
        stride, padding, dilation, groups = ctx.config
        if ctx.unbatched:
            delta, a = delta.unsqueeze(0), None if a is None else a.unsqueeze(0)
        if ctx.call is not None:
            see_convolution(ctx, delta, a, output, transposed=True)
            need_W, need_b = observe.needs(ctx, need_W, need_b)  # book-keeping DP-SGD forms them clipped
        grad_a = grad_W = grad_b = None
        if need_a:  # output_padding may leave δ room for one more position than a has: cut it
            grad_a = torch.convolution(delta, W, None, stride, padding, dilation, False, [0] * len(stride), groups)
            grad_a = _narrow_to(grad_a, ctx.a_size)
        if need_W:
            grad_W = conv_weight_grad(a, delta, ctx.kernel_size, stride, padding, dilation, groups)
        if need_b:
            grad_b = bias_grad(delta)
        if ctx.unbatched and grad_a is not None:
            grad_a = grad_a.squeeze(0)
        return grad_a, grad_W, grad_b, None, None, None, None, None


# ------------------------------------------------------------------ padding


def pad_source_index(n: int, before: int, after: int, mode: str, device) -> torch.Tensor:
    """For one padded dimension of size n: which input element each of the n + before + after
    outputs copies (reflect, replicate or circular)."""
    i = torch.arange(-before, n + after, device=device)
    if mode == "reflect":
        return (n - 1) - ((n - 1) - i.abs()).abs()
    if mode == "replicate":
        return i.clamp(0, n - 1)
    return i.remainder(n)  # circular


class Pad(torch.autograd.Function):
    """z = pad(a): constant, reflect, replicate or circular padding of the last len(pad)/2 dimensions.

    Every padded output copies one input element (or is the constant), so
        constant:  ∂J/∂a = δ with the padding cut off (pad by −pad; negative pads crop, and back)
        others:    ∂J/∂a = Σ of δ over every output copied from each element: along each padded
                   dimension, index_add of δ at the copy's source index (`pad_source_index`)
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, pad, mode, value):
        return F.pad(a, pad, mode=mode, value=value)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, ctx.pad, ctx.mode, _ = inputs
        ctx.a_shape = tuple(a.shape)

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        pad, mode = ctx.pad, ctx.mode
        if mode == "constant":
            return F.pad(delta, [-p for p in pad]), None, None, None
        grad = delta
        for j in range(len(pad) // 2):  # pad lists the last dimension first
            dim = delta.dim() - 1 - j
            n = ctx.a_shape[dim]
            index = pad_source_index(n, pad[2 * j], pad[2 * j + 1], mode, delta.device)
            shape = list(grad.shape)
            shape[dim] = n
            grad = grad.new_zeros(shape).index_add(dim, index, grad)
        return grad, None, None, None


def same_padding(kernel_size, dilation) -> tuple[list[int], list[int]]:
    """padding="same" as torch resolves it: total d(k−1) per dimension, the odd one extra on the right."""
    total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
    left = [t // 2 for t in total]
    return left, [t - lt for t, lt in zip(total, left)]
