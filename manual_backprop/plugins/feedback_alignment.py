"""Feedback alignment and sign symmetry: δ travels back through a matrix B, not through W.

Backprop sends the error back through the forward weights, δ(l) = W(l) δ(l+1) (torch's
layout: ∂J/∂a = δ W; for a convolution the transposed convolution of δ with W). This
family replaces W by another matrix B of the same shape in that one line:

    forward:   z = a Wᵀ + b          (conv: z = W ⋆ a + b)                        unchanged
    backward:  ∂J/∂a = δ B           (conv: the transposed convolution of δ with B)
               ∂J/∂W = δᵀ a,   ∂J/∂b = Σₙ δₙ   (each layer's update stays local) unchanged

The rule sets differ only in how B is made (`Feedback.B`, a function of W and M):

    rule set                          B                      M (buffer ``feedback``)
    feedback_alignment (FA)           M                      fixed random         Lillicrap et al. 2016
    sign_symmetry (uSF)               sign(W)                none                 Liao, Leibo, Poggio 2016
    batchwise_random_sign_symmetry    |M| ⊙ sign(W)          redrawn each backward  (brSF)  Moskovitz et al. 2018
    fixed_random_sign_symmetry        |M| ⊙ sign(W)          fixed                (frSF)

B is made from the current W at every backward. M is drawn as torch draws the layer's own
weight, uniform in ±1/√fan_in (fan_in = W[0].numel(): in_features, or C_in/groups·∏kernel),
from torch's global RNG at convert, so seeding torch before `convert` draws the same M again.
It is a non-persistent buffer: it follows `.to()` and deep copies, is not in the state_dict
(checkpoints keep stock keys), and `restore` removes it. Under DDP every process must send δ
through the same B: DDP broadcasts rank 0's buffers when it wraps the model (not with
broadcast_buffers=False), and `broadcast_feedback(model)` does so on demand (the Lightning tasks
call it at the start of fit). brSF's M is redrawn at each backward from each process's own RNG.

Each rule set runs on Linear, Conv1d/2d/3d, the fused `manual_backprop.nn.MLP` (whose
layers keep M as ``layers.{k}.feedback``) and the recurrent layers RNN, LSTM, GRU and their
cells (a B for W_ih, which carries δ to the input, and one for W_hh, which carries it back in
time: δh_{t−1} = B_hhᵀ δz_t; buffers ``feedback_ih_l0``, ``feedback_hh_l0``, …); every other
module keeps its ordinary rule.

    model = manual_backprop.convert(model, registry="sign_symmetry")
    # or: convert(model, registry=manual_backprop.plugins.feedback_alignment.registry("sign_symmetry"))
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import manual_backprop.nn as mnn
from manual_backprop import observe
from manual_backprop._amp import autocast_inputs, without_autocast
from manual_backprop._checks import InputError
from manual_backprop.functional.conv import _conv
from manual_backprop.nn.conv import _conv_forward
from manual_backprop.nn.recurrent import RECURRENT_CALLS
from manual_backprop.registry import Registry, supports_real_parameters
from manual_backprop.rules._apply import apply_rule
from manual_backprop.rules.conv import Convolution, bias_grad, conv_weight_grad, see_convolution, transposed_convolution
from manual_backprop.rules.linear import linear_seen, weight_and_bias_grads
from manual_backprop.rules.mlp import MLP as MLPRule

NAME = "feedback_alignment"


# ------------------------------------------------------------------ how B is made


def draw_M(W: torch.Tensor) -> torch.Tensor:
    """M: uniform in ±1/√fan_in, shaped like W (torch's own bound for a Linear or conv weight)."""
    fan_in = W[0].numel() if W.shape[0] else 0
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return torch.empty(W.shape, device=W.device, dtype=W.dtype).uniform_(-bound, bound)


def fixed_B(W, M):
    return M  # FA: B = M


def sign_B(W, M):
    return W.sign()  # uSF: B = sign(W)


def batchwise_random_sign_B(W, M):
    return draw_M(W).abs() * W.sign()  # brSF: B = |M| ⊙ sign(W), M drawn now


def fixed_random_sign_B(W, M):
    return M.abs() * W.sign()  # frSF: B = |M| ⊙ sign(W), M fixed


@dataclass(frozen=True)
class Feedback:
    """One rule set: its name, B(W, M), and whether it keeps a fixed M (buffer ``feedback``)."""

    name: str
    B: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    keeps_M: bool
    prefix: str  # of its module classes' names


RULE_SETS = {
    f.name: f
    for f in (
        Feedback("feedback_alignment", fixed_B, True, "FeedbackAlignment"),
        Feedback("sign_symmetry", sign_B, False, "SignSymmetry"),
        Feedback("batchwise_random_sign_symmetry", batchwise_random_sign_B, False, "BatchwiseRandomSignSymmetry"),
        Feedback("fixed_random_sign_symmetry", fixed_random_sign_B, True, "FixedRandomSignSymmetry"),
    )
}


# ------------------------------------------------------------------ the rules


class FeedbackLinear(torch.autograd.Function):
    """z = a Wᵀ + b;  ∂J/∂a = δ B,  ∂J/∂W = δᵀ a,  ∂J/∂b = Σₙ δₙ   with B = make_B(W, M), shaped like W."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, W, b, M, make_B):
        return F.linear(a, W, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, W, b, M, ctx.make_B = inputs
        need_a, need_W = ctx.needs_input_grad[:2]
        ctx.call = observe.keep(ctx, W, b)
        ctx.save_for_backward(a if need_W or ctx.call else None, W if need_a else None, M if need_a else None,
                              *observe.output(ctx, output))

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        a, W, M, *output = ctx.saved_tensors
        need_a, need_W, need_b = ctx.needs_input_grad[:3]
        if ctx.call is not None:
            ctx.call.see(linear_seen(ctx.call, delta, a, *ctx.params, *output))
        grad_a = delta @ ctx.make_B(W, M).to(delta.dtype) if need_a else None  # δ B, where backprop has δ W
        return grad_a, *weight_and_bias_grads(delta, a, need_W, need_b), None, None


def feedback_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    feedback: torch.Tensor | None, make_B: Callable = fixed_B) -> torch.Tensor:
    """F.linear whose backward sends δ through B = make_B(weight, feedback) instead of weight.

    With the default make_B, `feedback` is B itself (feedback alignment); it must have the weight's shape.
    """
    if feedback is not None and feedback.shape != weight.shape:
        raise InputError(
            f"feedback_linear: feedback must have the weight's shape {tuple(weight.shape)}, got {tuple(feedback.shape)}"
        )
    input, weight, bias = autocast_inputs("linear", input.device, input, weight, bias)
    return apply_rule(FeedbackLinear, input, weight, bias, None if feedback is None else feedback.detach(), make_B)


_convolution_forward = Convolution.forward  # a plain function: see FeedbackMLP


class FeedbackConvolution(torch.autograd.Function):
    """z = W ⋆ a + b (`rules.Convolution`'s forward);  ∂J/∂a = the transposed convolution of δ with B,
    ∂J/∂W = Σₙ Σ_positions δ ⊗ patch(a),  ∂J/∂b = Σ δ   with B = make_B(W, M), shaped like W."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, W, b, stride, padding, dilation, groups, M, make_B):
        return _convolution_forward(a, W, b, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, W, b, *ctx.config, M, ctx.make_B = inputs
        need_a, need_W = ctx.needs_input_grad[:2]
        ctx.unbatched = a.dim() == W.dim() - 1
        ctx.a_size, ctx.kernel_size = tuple(a.shape[2 - ctx.unbatched:]), tuple(W.shape[2:])
        ctx.call = observe.keep(ctx, W, b)
        ctx.save_for_backward(a if need_W or ctx.call else None, W if need_a else None, M if need_a else None,
                              *observe.output(ctx, output))

    @staticmethod
    @without_autocast
    def backward(ctx, delta):
        a, W, M, *output = ctx.saved_tensors
        need_a, need_W, need_b = ctx.needs_input_grad[:3]
        stride, padding, dilation, groups = ctx.config
        if ctx.unbatched:
            delta, a = delta.unsqueeze(0), None if a is None else a.unsqueeze(0)
        if ctx.call is not None:  # ∂J/∂W is backprop's, so the convolution's own report serves
            see_convolution(ctx, delta, a, output, transposed=False)
        grad_a = grad_W = grad_b = None
        if need_a:  # the transposed convolution of δ with B, where backprop has W
            B = ctx.make_B(W, M).to(delta.dtype)
            grad_a = transposed_convolution(delta, B, ctx.a_size, stride, padding, dilation, groups)
            grad_a = grad_a.squeeze(0) if ctx.unbatched else grad_a
        if need_W:
            grad_W = conv_weight_grad(delta, a, ctx.kernel_size, stride, padding, dilation, groups)
        if need_b:
            grad_b = bias_grad(delta)
        return grad_a, grad_W, grad_b, None, None, None, None, None, None


def feedback_conv(op: str, d: int, input, weight, bias, stride, padding, dilation, groups,
                  feedback: torch.Tensor | None, make_B: Callable = fixed_B) -> torch.Tensor:
    """F.conv{d}d (checks, padding strings, autocast as ours) whose backward sends δ through B = make_B(W, M)."""
    M = None if feedback is None else feedback.detach()
    return _conv(op, d, input, weight, bias, stride, padding, dilation, groups, FeedbackConvolution, (M, make_B))


class _Carry:
    """The fused MLP's matrix for δ below layer l: ∂J/∂a(l) = δ(l+1) B(l), B(l) = make_B(W(l), M(l))."""

    def __init__(self, make_B: Callable, Ms: tuple) -> None:
        self.make_B, self.Ms = make_B, Ms

    def __call__(self, l: int, delta: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        return delta.mm(self.make_B(W, self.Ms[l]).to(delta.dtype))


# The fused rule's three steps as plain functions: torch.compile traces a call of another
# Function's staticmethod through the class as a nested autograd call.
_mlp_forward, _mlp_setup_context, _mlp_backward = MLPRule.forward, MLPRule.setup_context, MLPRule.backward


class FeedbackMLP(MLPRule):
    """`rules.MLP` with one more argument last, `carry`: carry(l, δ(l+1), W(l)) is the ∂J/∂a(l) the
    backward loop sends below layer l (backprop's δ(l+1) W(l); here δ(l+1) B(l), or DFA's e B)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, layers, *weights_and_biases_and_carry):
        return _mlp_forward(a, layers, *weights_and_biases_and_carry[:-1])

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        _mlp_setup_context(ctx, inputs[:-1], outputs)  # needs_input_grad has one more entry, last: unread
        ctx.carry = inputs[-1]

    @staticmethod
    def backward(ctx, *grads):
        return (*_mlp_backward(ctx, *grads), None)  # autocast off: _mlp_backward is the decorated backward


def feedback_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's feedback state, by qualified name: each buffer ``feedback`` (M here, B of direct feedback
    alignment) or ``feedback_*``: a recurrent layer's M per weight (``feedback_ih_l0``, …), direct feedback
    alignment's B of layer k inside a stacked recurrent module (``feedback_l{k}``) and ``feedback_seed``
    (the seed of a B that direct feedback alignment draws at a convolution's first forward)."""
    return {name: buffer for name, buffer in model.named_buffers()
            if re.fullmatch(r"feedback(_\w+)?", name.rsplit(".", 1)[-1])}


def broadcast_feedback(model: torch.nn.Module, src: int = 0) -> None:
    """Give every process of the default torch.distributed group rank `src`'s feedback state
    (`feedback_buffers`), in place. Every process calls it, with the same model; a model with no such
    buffers broadcasts nothing."""
    import torch.distributed as dist

    for buffer in feedback_buffers(model).values():
        dist.broadcast(buffer, src)


# ------------------------------------------------------------------ modules


class FeedbackModule:
    """What every module of this family shares: M drawn at convert (if the rule set keeps one), removed at restore.

    Subclasses set `feedback_rule` (a `Feedback`). `feedback_pairs()` gives (name, W, B) per weight, for
    `manual_backprop.alignment`.
    """

    feedback_rule: Feedback

    def _feedback_layers(self) -> list[tuple[str, torch.nn.Module]]:
        """(name, module holding weight and M) for each weight B replaces."""
        return [("", self)]

    def after_convert(self) -> None:
        """Draw M for each weight (convert swaps the class, then calls this); converting twice keeps it."""
        if not self.feedback_rule.keeps_M:
            return
        for _, module in self._feedback_layers():
            if "feedback" not in module._buffers:
                module.register_buffer("feedback", draw_M(module.weight.detach()), persistent=False)

    def before_restore(self) -> None:
        for _, module in self._feedback_layers():
            module._buffers.pop("feedback", None)

    def feedback_pairs(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name of the layer, W, B) for each weight: B as the backward uses it now (brSF: one fresh draw)."""
        pairs = []
        for name, module in self._feedback_layers():
            W = module.weight.detach()
            pairs.append((name, W, self.feedback_rule.B(W, module._buffers.get("feedback"))))
        return pairs


class Linear(FeedbackModule, torch.nn.Linear):
    """torch.nn.Linear trained by a feedback rule (feedback alignment here; the other rule sets subclass it).

    Input: (*, H_in); output: (*, H_out). Buffer ``feedback`` (out_features, in_features): M, not in state_dict.
    """

    feedback_rule = RULE_SETS["feedback_alignment"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after_convert()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return feedback_linear(input, self.weight, self.bias, self._buffers.get("feedback"), self.feedback_rule.B)


class _FeedbackConvNd(FeedbackModule):
    _d = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after_convert()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        d, M, make_B = self._d, self._buffers.get("feedback"), self.feedback_rule.B
        return _conv_forward(self, input, lambda *args: feedback_conv(f"conv{d}d", d, *args, M, make_B))


class Conv1d(_FeedbackConvNd, torch.nn.Conv1d):
    """torch.nn.Conv1d trained by a feedback rule. Buffer ``feedback``: M, shaped like the weight."""

    feedback_rule, _d = RULE_SETS["feedback_alignment"], 1


class Conv2d(_FeedbackConvNd, torch.nn.Conv2d):
    """torch.nn.Conv2d trained by a feedback rule. Buffer ``feedback``: M, shaped like the weight."""

    feedback_rule, _d = RULE_SETS["feedback_alignment"], 2


class Conv3d(_FeedbackConvNd, torch.nn.Conv3d):
    """torch.nn.Conv3d trained by a feedback rule. Buffer ``feedback``: M, shaped like the weight."""

    feedback_rule, _d = RULE_SETS["feedback_alignment"], 3


class MLP(FeedbackModule, mnn.MLP):
    """manual_backprop.nn.MLP whose fused backward sends δ below layer l through B(l) instead of W(l).

    Buffers ``layers.{k}.feedback``: M(k), shaped like layer k's weight, not in state_dict.
    """

    feedback_rule = RULE_SETS["feedback_alignment"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after_convert()

    def _feedback_layers(self) -> list[tuple[str, torch.nn.Module]]:
        return [(f"layers.{k}", layer) for k, layer in enumerate(self.layers)]

    def _fused(self, input, *weights_and_biases):
        carry = _Carry(self.feedback_rule.B, tuple(layer._buffers.get("feedback") for layer in self.layers))
        return apply_rule(FeedbackMLP, input, self._rule_layers, *weights_and_biases, carry)[0]


class _FeedbackRecurrent(FeedbackModule):
    """RNN, LSTM, GRU and their cells: δ goes down to the input through B_ih and back in time through B_hh
    (an LSTM's projection: through B_hr), one B per weight; each weight's gradient stays Σ_t Σ_n δz_t aᵀ.

    Buffers ``feedback_ih_l0``, ``feedback_hh_l0``, … (cells: ``feedback_ih``, ``feedback_hh``): M for the
    weight of the same suffix, not in state_dict.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after_convert()

    def _weights(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n.removeprefix("weight_"), p) for n, p in self.named_parameters(recurse=False) if n.startswith("weight_")]

    def after_convert(self) -> None:
        if self.feedback_rule.keeps_M:
            for suffix, W in self._weights():
                if f"feedback_{suffix}" not in self._buffers:
                    self.register_buffer(f"feedback_{suffix}", draw_M(W.detach()), persistent=False)

    def before_restore(self) -> None:
        for suffix, _ in self._weights():
            self._buffers.pop(f"feedback_{suffix}", None)

    def _B(self, suffix: str, W: torch.Tensor) -> torch.Tensor:
        return self.feedback_rule.B(W.detach(), self._buffers.get(f"feedback_{suffix}")).detach()

    def feedback_pairs(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return [(f"weight_{suffix}", W.detach(), self._B(suffix, W)) for suffix, W in self._weights()]

    def recurrent_calls(self, input) -> dict:
        """torch's recurrent calls → ours with a B for each weight (made from the current W at each forward)."""
        if isinstance(self, torch.nn.RNNCellBase):
            feedback = (self._B("ih", self.weight_ih), self._B("hh", self.weight_hh))
        else:
            feedback = [self._B(n.removeprefix("weight_"), W) if n.startswith("weight_") else None
                        for n, W in zip(self._flat_weights_names, self._flat_weights)]
        return {stock: functools.partial(ours, feedback=feedback) for stock, ours in RECURRENT_CALLS.items()}


class RNN(_FeedbackRecurrent, mnn.RNN):
    """torch.nn.RNN trained by a feedback rule."""

    feedback_rule = RULE_SETS["feedback_alignment"]


class LSTM(_FeedbackRecurrent, mnn.LSTM):
    """torch.nn.LSTM trained by a feedback rule (proj_size: W_hr's B too)."""

    feedback_rule = RULE_SETS["feedback_alignment"]


class GRU(_FeedbackRecurrent, mnn.GRU):
    """torch.nn.GRU trained by a feedback rule."""

    feedback_rule = RULE_SETS["feedback_alignment"]


class RNNCell(_FeedbackRecurrent, mnn.RNNCell):
    """torch.nn.RNNCell trained by a feedback rule."""

    feedback_rule = RULE_SETS["feedback_alignment"]


class LSTMCell(_FeedbackRecurrent, mnn.LSTMCell):
    """torch.nn.LSTMCell trained by a feedback rule."""

    feedback_rule = RULE_SETS["feedback_alignment"]


class GRUCell(_FeedbackRecurrent, mnn.GRUCell):
    """torch.nn.GRUCell trained by a feedback rule."""

    feedback_rule = RULE_SETS["feedback_alignment"]


# One class per (rule set, module type): the same code, another `feedback_rule`. Named
# <Prefix><Type> at module level (so models pickle); repr shows the torch type's name.
_BASES = {torch.nn.Linear: Linear, torch.nn.Conv1d: Conv1d, torch.nn.Conv2d: Conv2d, torch.nn.Conv3d: Conv3d,
          mnn.MLP: MLP, torch.nn.RNN: RNN, torch.nn.LSTM: LSTM, torch.nn.GRU: GRU, torch.nn.RNNCell: RNNCell,
          torch.nn.LSTMCell: LSTMCell, torch.nn.GRUCell: GRUCell}
CLASSES: dict[str, dict[type, type]] = {}
for _rule in RULE_SETS.values():
    CLASSES[_rule.name] = {}
    for _stock, _base in _BASES.items():
        if _rule.name == NAME:
            _cls = _base
        else:
            _qualname = _rule.prefix + _base.__name__
            _cls = type(_base.__name__, (_base,), {"feedback_rule": _rule, "__module__": __name__,
                                                   "__qualname__": _qualname,
                                                   "__doc__": f"{_base.__name__} trained by {_rule.name}."})
            globals()[_qualname] = _cls
        CLASSES[_rule.name][_stock] = _cls
del _rule, _stock, _base


def registry(name: str = NAME) -> Registry:
    """The built-in rules, with Linear, Conv1d/2d/3d, the fused MLP and the recurrent layers trained by rule set `name`."""
    if name not in CLASSES:
        raise KeyError(f"no feedback rule set named {name!r}; available: {sorted(CLASSES)}")
    rules = Registry(builtins=True)
    for stock, manual in CLASSES[name].items():
        rules.register(stock, manual, supports=supports_real_parameters, override=True)
    return rules


def register(target: Registry) -> None:
    """Entry-point hook: offer each rule set as `convert(model, registry=NAME)`."""
    for name in RULE_SETS:
        target.add_rule_set(name, lambda name=name: registry(name))
