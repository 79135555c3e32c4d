"""Feedback alignment (Lillicrap et al., 2016): δ travels back through a fixed random B, not W.

Backprop sends the error back through the forward weights, δ(l) = W(l) δ(l+1) (torch's
layout: ∂J/∂a = δ W). Feedback alignment replaces W by a fixed random matrix B of the
same shape, drawn once and never trained:

    forward:   z = a Wᵀ + b                      (unchanged)
    backward:  ∂J/∂a = δ B                       (B instead of W)
               ∂J/∂W = δᵀ a,   ∂J/∂b = Σₙ δₙ     (unchanged: each layer's update is local)

B is a non-persistent buffer named ``feedback``: it follows `.to()` and deep copies but
is not in the state_dict, so checkpoints keep stock keys. It is drawn from torch's
global RNG like nn.Linear's own init (uniform in ±1/√in_features), so seed torch before
converting to get the same B again; a checkpoint does not carry it.

    model = manual_backprop.convert(model, registry="feedback_alignment")
    # or: convert(model, registry=manual_backprop.plugins.feedback_alignment.registry())
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from manual_backprop import observe
from manual_backprop._amp import autocast_inputs, without_autocast
from manual_backprop._checks import InputError
from manual_backprop.registry import Registry, supports_real_parameters
from manual_backprop.rules._apply import apply_rule
from manual_backprop.rules.linear import linear_seen, weight_and_bias_grads

NAME = "feedback_alignment"


class FeedbackLinear(torch.autograd.Function):
    """z = a Wᵀ + b;  ∂J/∂a = δ B,  ∂J/∂W = δᵀ a,  ∂J/∂b = Σₙ δₙ   (B: fixed, shaped like W)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, W, b, B):
        return F.linear(a, W, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, W, b, B = inputs
        need_a, need_W, _, _ = ctx.needs_input_grad
        ctx.call = observe.keep(ctx, W, b)
        ctx.save_for_backward(a if need_W or ctx.call else None, B if need_a else None, *observe.output(ctx, output))

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        a, B, *output = ctx.saved_tensors
        need_a, need_W, need_b, _ = ctx.needs_input_grad
        if ctx.call is not None:
            ctx.call.see(linear_seen(ctx.call, delta, a, *ctx.params, *output))
        grad_a = delta @ B.to(delta.dtype) if need_a else None  # δ B, where backprop has δ W
        return grad_a, *weight_and_bias_grads(delta, a, need_W, need_b), None


def feedback_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, feedback: torch.Tensor):
    """F.linear whose backward sends δ through `feedback` (shaped like weight) instead of weight."""
    if feedback.shape != weight.shape:
        raise InputError(
            f"feedback_linear: feedback must have the weight's shape {tuple(weight.shape)}, got {tuple(feedback.shape)}"
        )
    input, weight, bias = autocast_inputs("linear", input.device, input, weight, bias)
    return apply_rule(FeedbackLinear, input, weight, bias, feedback.detach())


class Linear(torch.nn.Linear):
    """torch.nn.Linear trained by feedback alignment. Input: (*, H_in); output: (*, H_out).

    Buffer ``feedback`` (out_features, in_features): the fixed random B, not in state_dict.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after_convert()

    def after_convert(self) -> None:
        """Draw B (convert swaps a torch.nn.Linear's class to this one, then calls this)."""
        if "feedback" in self._buffers:  # converting twice keeps the B the module already has
            return
        bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        W = self.weight
        B = torch.empty(W.shape, device=W.device, dtype=W.dtype).uniform_(-bound, bound)
        self.register_buffer("feedback", B, persistent=False)

    def before_restore(self) -> None:
        del self._buffers["feedback"]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return feedback_linear(input, self.weight, self.bias, self.feedback)


def registry() -> Registry:
    """The built-in rules, with torch.nn.Linear trained by feedback alignment."""
    rules = Registry(builtins=True)
    rules.register(torch.nn.Linear, Linear, supports=supports_real_parameters, override=True)
    return rules


def register(target: Registry) -> None:
    """Entry-point hook: offer the rule set as `convert(model, registry="feedback_alignment")`."""
    target.add_rule_set(NAME, registry)
