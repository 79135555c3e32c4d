"""Direct feedback alignment (Nøkland, 2016): every hidden layer gets the network's output error directly.

    e = δ of the output layer: ∂J/∂ŷ for the layer whose output ŷ is the network's (softmax + CE: ŷ − y)
    δ(l) = (e B(l)) ⊙ σ'(z(l))        hidden layer l; B(l): (K, out_features of l), fixed random
    ∂J/∂W(l) = δ(l)ᵀ a(l),  ∂J/∂b(l) = Σₙ δ(l)      unchanged; the output layer's own δ is e

How e reaches the layers, with our rules only (no autograd hooks): backward runs the output
layer first. Its rule keeps e in an `OutputError` that the model's DFA layers share, and each
DFA layer's backward sends e B(below) down as ∂J/∂a of its input, where "below" is the DFA
layer before it in registration order. What lies between them applies its own backward (the
activation's σ', dropout's mask), so the layer below receives δ = (e B) ⊙ σ'(z). The lowest
DFA layer sends backprop's δ W to its input (modules below it, convolutions for instance, keep
their ordinary rules and learn by backprop from that δ).

    model = manual_backprop.convert(model, registry="direct_feedback_alignment")

finds the output as the last Linear or fused MLP in registration order (the common case: a
network whose last parametric module produces the output). For other models name it:

    from manual_backprop.plugins import direct_feedback_alignment as dfa
    model = manual_backprop.convert(model, registry=dfa.registry(output="head"))

The other DFA layers are chained in registration order, which must follow the forward order;
each one's out_features must equal the in_features of the next (checked at convert).

Each hidden layer keeps B(l) as a non-persistent buffer ``feedback`` (the fused MLP: one per
layer, ``layers.{k}.feedback``), drawn at convert from torch's global RNG, uniform in ±1/√K
(K = the network's outputs); seed torch before `convert` to draw the same B again. The links
are plain attributes (`_dfa`), deep-copied with the model and removed by `restore`.
Under torch.compile the output error cannot pass between backward nodes: run DFA eagerly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import manual_backprop.nn as mnn
from manual_backprop import observe
from manual_backprop._amp import autocast_inputs, without_autocast
from manual_backprop.convert import ConversionError
from manual_backprop.plugins.feedback_alignment import FeedbackMLP
from manual_backprop.registry import Registry, supports_real_parameters
from manual_backprop.rules._apply import apply_rule
from manual_backprop.rules.linear import linear_seen, weight_and_bias_grads

NAME = "direct_feedback_alignment"


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
    """One DFA layer's place: its name, the shared error, whether it is the output, the DFA layer below."""

    name: str
    error: OutputError
    is_output: bool
    below: torch.nn.Module | None

    def B_below(self) -> torch.Tensor | None:
        """B of the layer below (what carries e to this layer's input), or None for the lowest layer."""
        if self.below is None:
            return None
        holder = self.below.layers[-1] if isinstance(self.below, mnn.MLP) else self.below
        return holder.feedback


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


def _draw_B(K: int, out_features: int, like: torch.Tensor) -> torch.Tensor:
    bound = 1 / math.sqrt(K) if K > 0 else 0.0
    return torch.empty(K, out_features, device=like.device, dtype=like.dtype).uniform_(-bound, bound)


class _DirectFeedback:
    """What the DFA modules share: their link, and B drawn for each hidden layer."""

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

    def _feedback_holders(self) -> list[torch.nn.Module]:
        return [self]

    def _fans(self) -> tuple[int, int]:
        return self.in_features, self.out_features


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


def link_layers(model: torch.nn.Module, output: str | None = None) -> None:
    """After convert: find the output layer, chain the DFA layers in registration order, draw each hidden B."""
    units = [(name, m) for name, m in model.named_modules() if isinstance(m, _DirectFeedback)]
    if output is None:
        if not units:
            raise ConversionError(
                "direct_feedback_alignment: the model has no Linear or fused MLP to take the output error"
            )
        output = units[-1][0]
    found = [m for name, m in units if name == output]
    if not found:
        raise ConversionError(
            f"direct_feedback_alignment: the output {output!r} is not a Linear or fused MLP of the model "
            f"(those are: {[name for name, _ in units]})"
        )
    out_module = found[0]
    K = out_module._fans()[1]
    error = OutputError(output)
    chain = [(name, m) for name, m in units if m is not out_module] + [(output, out_module)]
    below = None
    for name, module in chain:
        if below is not None and below[1]._fans()[1] != module._fans()[0]:
            raise ConversionError(
                f"direct_feedback_alignment: {name or '(root)'!r} takes {module._fans()[0]} features, but the DFA "
                f"layer before it in registration order, {below[0]!r}, gives {below[1]._fans()[1]}: e B cannot be "
                "its input's gradient (keep one of them on backprop with convert(exclude=...))"
            )
        is_output = module is out_module
        holders = module._feedback_holders()
        for k, holder in enumerate(holders):
            hidden = not (is_output and k == len(holders) - 1)
            B = holder._buffers.get("feedback")
            if hidden and (B is None or tuple(B.shape) != (K, holder.out_features)):
                holder.register_buffer("feedback", _draw_B(K, holder.out_features, holder.weight), persistent=False)
            elif not hidden:
                holder._buffers.pop("feedback", None)
        module.__dict__["_dfa"] = Link(name, error, is_output, None if below is None else below[1])
        below = (name, module)


def registry(output: str | None = None) -> Registry:
    """The built-in rules, with Linear and the fused MLP trained by DFA; `output`: the qualified name of
    the module that produces the network's output (default: the last Linear or MLP in registration order)."""
    rules = Registry(builtins=True)
    rules.register(torch.nn.Linear, Linear, supports=supports_real_parameters, override=True)
    rules.register(mnn.MLP, MLP, supports=supports_real_parameters, override=True)
    rules.model_hooks.append(lambda model: link_layers(model, output))
    return rules


def register(target: Registry) -> None:
    """Entry-point hook: offer the rule set as `convert(model, registry="direct_feedback_alignment")`."""
    target.add_rule_set(NAME, registry)
