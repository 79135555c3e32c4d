"""Learning rules other than backprop, measured against it: the names, and `alignment`.

A learning rule is a rule set (`convert(model, registry=NAME)`): the feedback family
(`feedback_alignment`, `sign_symmetry`, `batchwise_random_sign_symmetry`,
`fixed_random_sign_symmetry`) and `direct_feedback_alignment` ship as plugins; "backprop"
is the default registry. `alignment` gives, per layer, the angle between the update a rule
makes and the one backprop would make from the same batch: the quantity these papers plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from manual_backprop.convert import restore
from manual_backprop.registry import default_registry

BACKPROP = "backprop"


def learning_rule_names() -> list[str]:
    """"backprop" and every registered rule set name (plugins loaded), in that order."""
    return [BACKPROP, *default_registry().rule_set_names()]


@dataclass(frozen=True)
class LayerAlignment:
    """One weight's angles, in degrees (0: same direction, 90: orthogonal).

    update:   between the rule's ∂J/∂W and backprop's, from the same batch.
    feedback: between W and the B the rule sends δ through, where B is shaped like W (the
              feedback family); None otherwise (backprop: B = W; DFA: B is (K, out_features)).
    """

    name: str
    update: float
    feedback: float | None = None


class Alignments(dict):
    """`alignment`'s answer: {layer name: LayerAlignment}, keyed by the model's own names ("0" in an
    `nn.Sequential`, "net.layers.1" in a task's fused MLP). Asking for a layer it does not hold names
    the ones it does, so an example written for one model fails clearly on another."""

    def __missing__(self, name: str) -> LayerAlignment:
        raise KeyError(f"alignment: no layer named {name!r} with a weight in this model; its layers are: "
                       f"{', '.join(map(repr, self)) or 'none'}")


def angle(u: torch.Tensor, v: torch.Tensor) -> float:
    """The angle in degrees between two tensors read as vectors (nan if either is zero)."""
    u, v = u.detach().flatten().double(), v.detach().flatten().double()
    norms = u.norm() * v.norm()
    if norms == 0:
        return math.nan
    return math.degrees(math.acos(float((u @ v / norms).clamp(-1, 1))))


def alignment(
    model: torch.nn.Module,
    input: torch.Tensor,
    target: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Alignments:
    """Per layer with a weight (≥ 2-D, e.g. Linear, conv, each layer of a fused MLP; each weight_ih_l0,
    weight_hh_l0, ... of a recurrent layer on its own): its `LayerAlignment`.

    Runs `loss_fn(model(input), target)` once on `model` (its rule's gradients) and once on a
    restored copy (`restore`, stock modules: backprop's), from the same parameters, each from the
    caller's RNG state (which it leaves as it was), without touching any `.grad`. Keys are the layers'
    qualified names in `model` ("0" and "2" for `nn.Sequential(Linear, Tanh, Linear)`, "net.layers.1" for a
    task's fused MLP); a name it does not hold raises a KeyError listing those it does. Put the model
    in eval mode first if dropout should not differ between the runs.
    """
    # a layer's `weight`, keyed by the layer; a recurrent layer's weight_ih_l0, weight_hh_l0, ... by their own names
    weights = {(name.removesuffix(".weight").removesuffix("weight") if name.rsplit(".", 1)[-1] == "weight" else name): name
               for name, p in model.named_parameters()
               if name.rsplit(".", 1)[-1].startswith("weight") and p.dim() >= 2 and p.requires_grad}
    own, reference = dict(model.named_parameters()), restore(model)  # a copy on stock modules
    reference_params = dict(reference.named_parameters())
    names = list(weights)
    params = [own[weights[n]] for n in names]
    stock = [reference_params[weights[n]] for n in names]
    devices = [input.device] if input.device.type == "cuda" else []
    # Each run starts from the caller's RNG state (the same dropout masks), which is left as it was.
    with torch.random.fork_rng(devices=devices):
        rule_grads = torch.autograd.grad(loss_fn(model(input), target), params, allow_unused=True)
    with torch.random.fork_rng(devices=devices):
        backprop_grads = torch.autograd.grad(loss_fn(reference(input), target), stock, allow_unused=True)
        feedback = {}
        for module_name, module in model.named_modules():
            pairs = getattr(module, "feedback_pairs", None)
            if callable(pairs):  # brSF draws its M here: inside the fork too
                for suffix, W, B in pairs():
                    feedback[".".join(part for part in (module_name, suffix) if part)] = angle(W, B)
    return Alignments({
        name: LayerAlignment(
            name,
            math.nan if g is None or g_bp is None else angle(g, g_bp),
            feedback.get(name),
        )
        for name, g, g_bp in zip(names, rule_grads, backprop_grads)
    })
