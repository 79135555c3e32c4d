"""Direct feedback alignment (Nøkland, 2016): every hidden layer gets the network's output error directly.

    e = δ of the output layer: ∂J/∂ŷ for the layer whose output ŷ is the network's (softmax + CE: ŷ − y)
    δ(l) = (e B(l)) ⊙ σ'(z(l))        hidden layer l; B(l): (K, out_features of l), fixed random
    ∂J/∂W(l) = δ(l)ᵀ a(l),  ∂J/∂b(l) = Σₙ δ(l)      unchanged; the output layer's own δ is e

How e reaches the layers, with our rules only (no autograd hooks): backward runs the output
layer first. Its rule keeps e in an `OutputError` that the model's DFA layers share, and each
DFA layer's backward sends e B(below) down as ∂J/∂a of its input, where "below" is the DFA
layer before it in registration order. What lies between them applies its own backward (the
activation's σ', dropout's mask, a max-pool's routing), so the layer below receives
δ = (e B) ⊙ σ'(z). The lowest DFA layer sends backprop's δ W to its input.

B(l) is shaped (K, what the next DFA layer takes): (K, out_features of l) in a chain of Linear
layers; below a Linear after Flatten, (K, C·H·W); below a convolution, (K, C, H, W) of that
convolution's input (after pooling, say), drawn at its first forward from a generator whose
seed was drawn at convert (kept beside B as the buffer ``feedback_seed``). Convolutions
(Conv1d/2d/3d) are hidden layers; the output is a Linear or fused MLP.

    model = manual_backprop.convert(model, registry="direct_feedback_alignment")

finds the output as the last Linear or fused MLP in registration order (the common case: a
network whose last parametric module produces the output). For other models name it:

    from manual_backprop.plugins import direct_feedback_alignment as dfa
    model = manual_backprop.convert(model, registry=dfa.registry(output="head"))

The other DFA layers are chained in registration order, which must follow the forward order;
between Linear layers and MLPs, each one's out_features must equal the next one's in_features
(checked at convert).

Each hidden layer keeps B(l) as a non-persistent buffer ``feedback`` (the fused MLP: one per
layer, ``layers.{k}.feedback``), drawn from torch's global RNG at convert, uniform in ±1/√K
(K = the network's outputs); seed torch before `convert` to draw the same B again. The links
are plain attributes (`_dfa`), deep-copied with the model and removed by `restore`.
Under DDP every process must use the same B: each B and seed is a buffer, which DDP sets to rank 0's
when it wraps the model (unless broadcast_buffers=False), and `feedback_alignment.broadcast_feedback`
does so on demand (the Lightning tasks call it at the start of fit).
Under torch.compile the output error cannot pass between backward nodes: run DFA eagerly.

Recurrent layers (RNN, LSTM, GRU; hidden layers only) get e B at their output at every step,
e B(below) at their input, and run the notes' recursion in time through W_hh inside the layer.
Where the layer above reads the output flattened over time (N, T · width), as MNIST-1D's GRU does, B
is (K, T · width): each step gets its own e B. A stacked one (num_layers > 1) is one hidden layer per
layer: layer l's output gets e B(l) at every step (B(l): (K, its output width), the non-persistent
buffer ``feedback_l{l}``; after the dropout between layers, whose mask then applies to it, as to any
dropout between DFA layers).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

import manual_backprop.nn as mnn
from manual_backprop import observe
from manual_backprop._amp import autocast_inputs, without_autocast
from manual_backprop.convert import ConversionError
from manual_backprop.functional.conv import _conv
from manual_backprop.nn.conv import _conv_forward
from manual_backprop.plugins.feedback_alignment import FeedbackMLP
from manual_backprop.registry import Registry, supports_real_parameters
from manual_backprop.rules._apply import apply_rule
from manual_backprop.rules.conv import Convolution, bias_grad, conv_weight_grad, see_convolution, transposed_convolution
from manual_backprop.rules.linear import linear_seen, weight_and_bias_grads

NAME = "direct_feedback_alignment"
_convolution_forward = Convolution.forward  # a plain function: see FeedbackMLP


class OutputError:
    """e, the output layer's δ of the latest backward, shared by a converted model's DFA layers."""

    def __init__(self, output: str) -> None:
        self.output, self.e = output, None

    def get(self, layer: str) -> torch.Tensor:
        if self.e is None:
            raise RuntimeError(
                f"direct_feedback_alignment: {layer or '(root)'!r} ran backward before the output layer "
                f"{self.output or '(root)'!r} did, so there is no output error e to send: the loss must be "
                "computed from the output layer's output (mark the right one with "
                "registry(output=NAME) from manual_backprop.plugins.direct_feedback_alignment)"
            )
        return self.e


@dataclass(eq=False)
class Link:
    """One DFA layer's place: its name, the shared error, whether it is the output, the DFA layer below.

    For a convolution, whose input size is known only at its first forward, B(below) is drawn then, by
    a generator seeded with the holder's buffer ``feedback_seed`` (itself drawn from torch's RNG at
    convert; a buffer, so that DDP gives every process rank 0's).
    """

    name: str
    error: OutputError
    is_output: bool
    below: torch.nn.Module | None
    K: int = 0

    def holder(self) -> torch.nn.Module:
        return self.below.layers[-1] if isinstance(self.below, mnn.MLP) else self.below

    def B_below(self, input_shape: tuple | None = None) -> torch.Tensor | None:
        """B of the layer below (what carries e to this layer's input), or None for the lowest layer.

        input_shape (a convolution's input, per sample): B is (K, *input_shape), drawn at the first call.
        """
        if self.below is None:
            return None
        holder = self.holder()
        B = holder._buffers.get("feedback")
        if input_shape is not None and (B is None or tuple(B.shape[1:]) != tuple(input_shape)):
            seed = int(holder._buffers["feedback_seed"])
            generator = torch.Generator(device=_like(holder).device).manual_seed(seed)
            B = _draw_B(self.K, tuple(input_shape), _like(holder), generator)
            holder.register_buffer("feedback", B, persistent=False)
        return B


class DirectFeedbackLinear(torch.autograd.Function):
    """z = a Wᵀ + b;  ∂J/∂a = e B(below) (δ W for the lowest layer),  ∂J/∂W = δᵀ a,  ∂J/∂b = Σₙ δₙ.

    The output layer's backward first keeps e = δ in link.error.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, W, b, B_below, link):
        return F.linear(a, W, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, W, b, B_below, ctx.link = inputs
        need_a, need_W = ctx.needs_input_grad[:2]
        ctx.call = observe.keep(ctx, W, b)
        ctx.save_for_backward(a if need_W or ctx.call else None, W if need_a and B_below is None else None,
                              B_below if need_a else None, *observe.output(ctx, output))

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        a, W, B_below, *output = ctx.saved_tensors
        need_a, need_W, need_b = ctx.needs_input_grad[:3]
        link = ctx.link
        if link.is_output:
            link.error.e = delta  # e = ∂J/∂ŷ
        if ctx.call is not None:
            ctx.call.see(linear_seen(ctx.call, delta, a, *ctx.params, *output))
        grad_a = None
        if need_a and B_below is None:
            grad_a = delta @ W  # the lowest DFA layer: backprop's δ W to whatever lies below
        elif need_a:
            e = link.error.get(link.name)
            grad_a = (e @ B_below.to(e.dtype)).reshape(*delta.shape[:-1], B_below.shape[1])  # e B, not δ W
        return grad_a, *weight_and_bias_grads(delta, a, need_W, need_b), None, None


class _DirectCarry:
    """The fused MLP's ∂J/∂a(l) under DFA: e B(l−1) (B(−1): the layer below the MLP; none: δ W)."""

    def __init__(self, link: Link, Bs: list) -> None:
        self.link, self.Bs = link, Bs

    def __call__(self, l: int, delta: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        if l == len(self.Bs) and self.link.is_output:  # the top layer runs first: its δ is e
            self.link.error.e = delta
        B = self.Bs[l - 1] if l > 0 else self.link.B_below()
        if B is None:
            return delta.mm(W)
        e = self.link.error.get(f"{self.link.name}.layers.{l}" if self.link.name else f"layers.{l}")
        return e.reshape(-1, B.shape[0]).mm(B.to(e.dtype))


def _draw_B(K: int, shape, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """B: (K, *shape), uniform in ±1/√K (torch's bound for a Linear layer taking K inputs)."""
    bound = 1 / math.sqrt(K) if K > 0 else 0.0
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    B = torch.empty(K, *shape, device=like.device, dtype=like.dtype)
    return B.uniform_(-bound, bound, generator=generator)


class DirectFeedbackConvolution(torch.autograd.Function):
    """z = W ⋆ a + b;  ∂J/∂a = e B(below) reshaped like a (for the lowest layer: backprop's transposed
    convolution of δ with W),  ∂J/∂W = Σₙ Σ_positions δ ⊗ patch(a),  ∂J/∂b = Σ δ."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, W, b, stride, padding, dilation, groups, link):
        return _convolution_forward(a, W, b, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, W, b, *ctx.config, ctx.link = inputs
        need_a, need_W = ctx.needs_input_grad[:2]
        ctx.unbatched = a.dim() == W.dim() - 1
        ctx.a_shape, ctx.kernel_size = tuple(a.shape), tuple(W.shape[2:])
        ctx.call = observe.keep(ctx, W, b)
        # B(below) shaped like one sample of a as this rule sees it (after any padding), drawn the first time
        B_below = None if ctx.link.below is None else ctx.link.B_below(ctx.a_shape[1 - ctx.unbatched:]).detach()
        ctx.save_for_backward(a if need_W or ctx.call else None, W if need_a and B_below is None else None,
                              B_below if need_a else None, *observe.output(ctx, output))

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        a, W, B_below, *output = ctx.saved_tensors
        need_a, need_W, need_b = ctx.needs_input_grad[:3]
        stride, padding, dilation, groups = ctx.config
        grad_a = grad_W = grad_b = None
        if need_a and B_below is not None:  # e B, shaped like a
            e = ctx.link.error.get(ctx.link.name)
            grad_a = (e.reshape(-1, B_below.shape[0]) @ B_below.flatten(1).to(e.dtype)).reshape(ctx.a_shape)
        if ctx.unbatched:
            delta, a = delta.unsqueeze(0), None if a is None else a.unsqueeze(0)
        if ctx.call is not None:  # ∂J/∂W is backprop's, so the convolution's own report serves
            see_convolution(ctx, delta, a, output, transposed=False)
        if need_a and B_below is None:  # the lowest DFA layer: backprop's
            spatial = ctx.a_shape[2 - ctx.unbatched:]
            grad_a = transposed_convolution(delta, W, spatial, stride, padding, dilation, groups)
            grad_a = grad_a.squeeze(0) if ctx.unbatched else grad_a
        if need_W:
            grad_W = conv_weight_grad(delta, a, ctx.kernel_size, stride, padding, dilation, groups)
        if need_b:
            grad_b = bias_grad(delta)
        return grad_a, grad_W, grad_b, None, None, None, None, None


class _DirectFeedback:
    """What the DFA modules share: their link, and B drawn for each hidden layer."""

    hidden_only = False  # convolutions and recurrent layers are never the output layer

    def _dfa_link(self) -> Link:
        link = self.__dict__.get("_dfa")
        if link is None:
            raise RuntimeError(
                f"direct_feedback_alignment: this {type(self).__name__} is not linked to a model's output; "
                "convert the whole model with registry='direct_feedback_alignment'"
            )
        return link

    def before_restore(self) -> None:
        self.__dict__.pop("_dfa", None)
        for module in self._feedback_holders():
            module._buffers.pop("feedback", None)
            module._buffers.pop("feedback_seed", None)

    def _feedback_holders(self) -> list[torch.nn.Module]:
        return [self]

    def _fans(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def _draw_inner(self, K: int) -> None:
        """Draw the B of layers inside this module that no other module links (a stacked recurrent layer's)."""


class Linear(_DirectFeedback, torch.nn.Linear):
    """torch.nn.Linear trained by direct feedback alignment. Input: (*, H_in); output: (*, H_out).

    Buffer ``feedback`` (K, out_features) on hidden layers: B, not in state_dict.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        link = self._dfa_link()
        if link.is_output:
            link.error.e = None  # a new forward: the next e comes from this output's backward
        input, weight, bias = autocast_inputs("linear", input.device, input, self.weight, self.bias)
        B_below = link.B_below()
        return apply_rule(DirectFeedbackLinear, input, weight, bias, None if B_below is None else B_below.detach(), link)


class _DirectFeedbackConvNd(_DirectFeedback):
    """A convolution trained by DFA: a hidden layer (never the output), B(below) drawn at its first forward."""

    _d = 0
    hidden_only = True

    def _fans(self) -> tuple[int | None, int | None]:
        return None, None  # sizes known only from the input: checked at the first forward

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        link, d = self._dfa_link(), self._d
        return _conv_forward(self, input, lambda *args: _conv(f"conv{d}d", d, *args, DirectFeedbackConvolution, (link,)))


class Conv1d(_DirectFeedbackConvNd, torch.nn.Conv1d):
    """torch.nn.Conv1d trained by DFA. Buffer ``feedback`` (K, *the next DFA layer's input) when one lies above."""

    _d = 1


class Conv2d(_DirectFeedbackConvNd, torch.nn.Conv2d):
    """torch.nn.Conv2d trained by DFA. Buffer ``feedback`` (K, *the next DFA layer's input) when one lies above."""

    _d = 2


class Conv3d(_DirectFeedbackConvNd, torch.nn.Conv3d):
    """torch.nn.Conv3d trained by DFA. Buffer ``feedback`` (K, *the next DFA layer's input) when one lies above."""

    _d = 3


class MLP(_DirectFeedback, mnn.MLP):
    """manual_backprop.nn.MLP trained by direct feedback alignment: layer l's δ is (e B(l)) ⊙ σ'.

    Buffers ``layers.{k}.feedback`` (K, out_features of layer k) on its hidden layers: B(k), not in state_dict.
    """

    def _feedback_holders(self) -> list[torch.nn.Module]:
        return list(self.layers)

    def _fans(self) -> tuple[int, int]:
        return self.sizes[0], self.sizes[-1]

    def _fused(self, input, *weights_and_biases):
        link = self._dfa_link()
        if link.is_output:
            link.error.e = None
        Bs = [layer._buffers.get("feedback") for layer in self.layers]
        carry = _DirectCarry(link, [None if B is None else B.detach() for B in Bs[:-1]])
        return apply_rule(FeedbackMLP, input, self._rule_layers, *weights_and_biases, carry)[0]


def _like(holder: torch.nn.Module) -> torch.Tensor:
    """A weight of the module that holds a B: the device and dtype B is drawn in."""
    weight = getattr(holder, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else next(holder.parameters())


# ------------------------------------------------------------------ recurrent layers


def project_error(e: torch.Tensor, B: torch.Tensor, shape: tuple, time_dim) -> torch.Tensor:
    """e B shaped like a recurrent layer's output or input (`shape`): row for row where e has a row per step
    and sample (an output layer applied at every step); each sample's row over all its steps where B covers
    them all (B: (K, T · width), the output flattened over time into the next layer); else one row per sample
    sent to every step: along `time_dim` of a padded batch, or, for a PackedSequence's data, to the rows
    `time_dim` (the sample of each packed row, `packed_samples`) names."""
    eB = e.reshape(-1, B.shape[0]) @ B.to(e.dtype)
    width = shape[-1]
    if eB.numel() == math.prod(shape) and eB.shape[-1] == width:
        return eB.reshape(shape)
    if eB.numel() == math.prod(shape) and not isinstance(time_dim, torch.Tensor):
        steps = eB.reshape(eB.shape[0], -1, width)  # (N, T, width): sample n's steps, as flatten(1) laid them
        return (steps if time_dim == 1 else steps.transpose(0, 1)).reshape(shape)
    if isinstance(time_dim, torch.Tensor):
        if eB.shape[0] * shape[-1] == eB.numel() and eB.shape[0] == int(time_dim.max()) + 1:
            return eB[time_dim.to(eB.device)]
        per_sample = (int(time_dim.max()) + 1, shape[-1])
    else:
        per_sample = list(shape)
        per_sample[time_dim] = 1
        if eB.numel() == math.prod(per_sample):
            return eB.reshape(per_sample).expand(shape)
    raise RuntimeError(
        f"direct_feedback_alignment: the output error e of shape {tuple(e.shape)} has neither a row per step "
        f"and sample nor one per sample of the recurrent layer's {tuple(shape)} ({tuple(per_sample)} per sample)"
    )


def packed_samples(packed: PackedSequence) -> torch.Tensor:
    """The sample (its index in the batch before packing) of each row of a PackedSequence's data."""
    N = int(packed.batch_sizes[0])
    order = torch.arange(N) if packed.sorted_indices is None else packed.sorted_indices.cpu()
    return torch.cat([order[:B] for B in packed.batch_sizes.tolist()])


class DirectFeedbackError(torch.autograd.Function):
    """a → a;  backward: e B in place of the gradient that arrived (`project_error`): a recurrent layer's
    δ at its output at every step, and what it sends to its input when a DFA layer lies below."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, B, link, time_dim):
        return a.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, B, ctx.link, ctx.time_dim = inputs
        ctx.shape = tuple(a.shape)
        ctx.save_for_backward(B)

    @staticmethod
    @without_autocast
    def backward(ctx, grad):
        (B,) = ctx.saved_tensors
        e = ctx.link.error.get(ctx.link.name)
        return project_error(e, B, ctx.shape, ctx.time_dim), None, None, None


class _DirectFeedbackRecurrent(_DirectFeedback):
    """RNN, LSTM or GRU trained by DFA, a hidden layer: its output's δ at every step t is e B (B: (K, output
    width), drawn when a DFA layer lies above), its input gets e B(below) when a DFA layer lies below (the
    lowest DFA layer sends backprop's δ W_ih), and inside the layer δ runs back in time through W_hh, the
    notes' recursion. Stacked (num_layers > 1), each layer l below the top one gets e B(l) at its output
    (buffer ``feedback_l{l}``), not layer l + 1's δ W_ih. A PackedSequence's data gets e B row for row, or
    each sample's row at its own steps."""

    hidden_only = True

    def _fans(self) -> tuple[int, int]:
        return self.input_size, self._width()

    def _width(self) -> int:
        """The output width of each layer: (proj_size or hidden_size) per direction."""
        return (self.proj_size or self.hidden_size) * (1 + self.bidirectional)

    def _draw_inner(self, K: int) -> None:
        for layer in range(self.num_layers - 1):  # B(l) for layer l's output, read by layer l + 1
            B = self._buffers.get(f"feedback_l{layer}")
            if B is None or tuple(B.shape) != (K, self._width()):
                self.register_buffer(f"feedback_l{layer}", _draw_B(K, self._width(), self.weight_ih_l0), persistent=False)

    def before_restore(self) -> None:
        super().before_restore()
        for layer in range(self.num_layers - 1):
            self._buffers.pop(f"feedback_l{layer}", None)

    def recurrent_calls(self, input) -> dict:
        """torch's stacked recurrent calls → ours with layer l's output δ replaced by e B(l), l < num_layers − 1."""
        calls = super().recurrent_calls(input)
        if self.num_layers == 1:
            return calls
        link = self._dfa_link()
        # where a sample's one row of e goes: a PackedSequence's row samples, else the time dimension of the
        # call's 3-d layout (torch gives an unbatched input its batch dimension before the call)
        time_dim = packed_samples(input) if isinstance(input, PackedSequence) else 1 if self.batch_first else 0
        Bs = [self._buffers[f"feedback_l{layer}"].detach() for layer in range(self.num_layers - 1)]

        def between(layer: int, x: torch.Tensor) -> torch.Tensor:
            return apply_rule(DirectFeedbackError, x, Bs[layer], link, time_dim)

        stacked = (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)
        return {stock: functools.partial(ours, between=between) if stock in stacked else ours
                for stock, ours in calls.items()}

    def forward(self, input, hx=None):
        link = self._dfa_link()
        packed = isinstance(input, PackedSequence)
        time_dim = packed_samples(input) if packed else 1 if self.batch_first and input.dim() == 3 else 0

        def feedback(x, B):  # x → x, its δ replaced by e B; on a PackedSequence, on its data
            if not packed:
                return apply_rule(DirectFeedbackError, x, B.detach(), link, time_dim)
            return x._replace(data=apply_rule(DirectFeedbackError, x.data, B.detach(), link, time_dim))

        B_below = link.B_below()
        if B_below is not None:
            input = feedback(input, B_below)
        output, state = super().forward(input, hx)
        B = self._buffers.get("feedback")
        if B is not None:
            output = feedback(output, B)
        return output, state


class RNN(_DirectFeedbackRecurrent, mnn.RNN):
    """torch.nn.RNN trained by DFA. Buffer ``feedback`` (K, output width) when a DFA layer lies above."""


class LSTM(_DirectFeedbackRecurrent, mnn.LSTM):
    """torch.nn.LSTM trained by DFA. Buffer ``feedback`` (K, output width) when a DFA layer lies above."""


class GRU(_DirectFeedbackRecurrent, mnn.GRU):
    """torch.nn.GRU trained by DFA. Buffer ``feedback`` (K, output width) when a DFA layer lies above."""


def link_layers(model: torch.nn.Module, output: str | None = None) -> None:
    """After convert: find the output layer, chain the DFA layers in registration order, draw each hidden B."""
    units = [(name, m) for name, m in model.named_modules() if isinstance(m, _DirectFeedback)]
    if output is None:
        outputs = [name for name, m in units if not m.hidden_only]
        if not outputs:
            raise ConversionError(
                "direct_feedback_alignment: the model has no Linear or fused MLP to produce the output error e"
            )
        output = outputs[-1]
    found = [m for name, m in units if name == output]
    if not found:
        raise ConversionError(
            f"direct_feedback_alignment: the output {output!r} is not a Linear, convolution or fused MLP of the "
            f"model (those are: {[name for name, _ in units]})"
        )
    out_module = found[0]
    if out_module.hidden_only:
        raise ConversionError(
            f"direct_feedback_alignment: the output {output!r} is a "
            f"{'convolution' if isinstance(out_module, _DirectFeedbackConvNd) else 'recurrent layer'}; the output "
            "layer must be a Linear or fused MLP (mark one with registry(output=NAME))"
        )
    K = out_module._fans()[1]
    error = OutputError(output)
    chain = [(name, m) for name, m in units if m is not out_module] + [(output, out_module)]
    below = None
    for name, module in chain:
        fan_in, below_out = module._fans()[0], None if below is None else below[1]._fans()[1]
        flattened = below is not None and isinstance(below[1], _DirectFeedbackRecurrent) and fan_in is not None
        if flattened and fan_in % below_out == 0:
            below_out = fan_in  # its output flattened over fan_in / below_out steps: its B covers every step
        if below_out is not None and fan_in is not None and below_out != fan_in:
            raise ConversionError(
                f"direct_feedback_alignment: {name or '(root)'!r} takes {fan_in} features, but the DFA "
                f"layer before it in registration order, {below[0]!r}, gives {below_out}: e B cannot be "
                "its input's gradient (keep one of them on backprop with convert(exclude=...))"
            )
        is_output = module is out_module
        holders = module._feedback_holders()
        for k, holder in enumerate(holders[:-1]):  # a fused MLP's inner layers: B(k) is (K, out_features)
            B = holder._buffers.get("feedback")
            if B is None or tuple(B.shape) != (K, holder.out_features):
                holder.register_buffer("feedback", _draw_B(K, holder.out_features, holder.weight), persistent=False)
        module._draw_inner(K)
        if is_output:  # the output's own top layer carries nothing down
            holders[-1]._buffers.pop("feedback", None)
        link = Link(name, error, is_output, None if below is None else below[1], K)
        if below is not None:  # B(below): (K, what this layer takes), drawn on the layer below
            B = link.holder()._buffers.get("feedback")
            if fan_in is None:  # a convolution: its input size is known at its first forward
                link.holder().register_buffer("feedback_seed", torch.randint(2**62, ()), persistent=False)
            elif B is None or tuple(B.shape) != (K, fan_in):
                link.holder().register_buffer("feedback", _draw_B(K, fan_in, _like(link.holder())), persistent=False)
        module.__dict__["_dfa"] = link
        below = (name, module)


def registry(output: str | None = None) -> Registry:
    """The built-in rules, with Linear, Conv1d/2d/3d and the fused MLP trained by DFA; `output`: the qualified name of
    the module that produces the network's output (default: the last Linear or MLP in registration order)."""
    rules = Registry(builtins=True)
    rules.register(torch.nn.Linear, Linear, supports=supports_real_parameters, override=True)
    rules.register(mnn.MLP, MLP, supports=supports_real_parameters, override=True)
    for stock, manual in ((torch.nn.Conv1d, Conv1d), (torch.nn.Conv2d, Conv2d), (torch.nn.Conv3d, Conv3d),
                          (torch.nn.RNN, RNN), (torch.nn.LSTM, LSTM), (torch.nn.GRU, GRU)):
        rules.register(stock, manual, supports=supports_real_parameters, override=True)
    rules.model_hooks.append(lambda model: link_layers(model, output))
    return rules


def register(target: Registry) -> None:
    """Entry-point hook: offer the rule set as `convert(model, registry="direct_feedback_alignment")`."""
    target.add_rule_set(NAME, registry)
