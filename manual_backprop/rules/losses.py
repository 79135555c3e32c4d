"""Losses: each produces the output error δ(L) = ∂J/∂z(L) that starts the backward pass.

    mse_loss                            δ = 2 (ŷ − y)                 (the MSE residual)
    binary_cross_entropy (on ŷ = a)     ∂J/∂a = (a − y) / (a (1 − a))   → δ = ŷ − y after sigmoid's σ'
    binary_cross_entropy_with_logits    δ = σ(z) − y
    cross_entropy                       δ = softmax(z) − y

each times the incoming gradient, the per-element weight, and 1/N for reduction="mean".
Forward values come from torch's own numerically stable kernels (log-sum-exp,
log-sigmoid, torch's log clamp at −100), so logits of ±1e4 give the same finite
losses as torch; backward is the formula above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from manual_backprop._amp import without_autocast
from manual_backprop.rules._apply import direct_backward  # the engine calls backward itself


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def incoming(grad: torch.Tensor, reduction: str, numel: int) -> torch.Tensor:
    """∂J/∂loss per element: grad itself ("none", "sum") or grad / N ("mean")."""
    return grad / numel if reduction == "mean" else grad


@direct_backward
class MSELoss(torch.autograd.Function):
    """J = reduce(w (ŷ − y)²);  δ = ∂J/∂ŷ = 2 w (ŷ − y) · g,  ∂J/∂y = −δ   (w = 1 if None).

    "mean" divides by the element count, or by Σ w when weights are given (as torch).
    ŷ and y broadcast (torch warns when their sizes differ); each gradient is summed
    back to its own shape.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, reduction):
        residual = input - target
        squared = residual * residual if weight is None else residual * residual * weight
        if reduction == "mean" and weight is not None:
            loss = squared.sum() / weight.sum()
        else:
            loss = reduce(squared, reduction)
        return loss

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, ctx.reduction = inputs
        # Save ŷ and y, not the residual: double backward must see ŷ − y as a function of ŷ.
        ctx.save_for_backward(input, target, weight)

    @staticmethod
    @without_autocast
    def backward(ctx, grad):
        input, target, weight = ctx.saved_tensors
        residual = input - target
        if weight is None:
            delta = 2 * residual * incoming(grad, ctx.reduction, residual.numel())
        else:
            g = grad / weight.sum() if ctx.reduction == "mean" else grad
            delta = 2 * residual * weight * g
        need_input, need_target = ctx.needs_input_grad[:2]
        grad_input = delta.sum_to_size(input.shape) if need_input else None
        grad_target = (-delta).sum_to_size(target.shape) if need_target else None
        return grad_input, grad_target, None, None


@direct_backward
class BinaryCrossEntropy(torch.autograd.Function):
    """J = −w [y log a + (1 − y) log(1 − a)]  on probabilities a (logs clamped at −100, as torch).

    ∂J/∂a = w (a − y) / max(a (1 − a), 1e−12) · g      ∂J/∂y = −w logit(a) · g
    Followed by sigmoid's σ' = a (1 − a) this is the notes' δ(L) = ŷ − y.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, y, weight, reduction):
        return F.binary_cross_entropy(a, y, weight, reduction=reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, y, weight, ctx.reduction = inputs
        ctx.save_for_backward(a, y, weight)

    @staticmethod
    @without_autocast
    def backward(ctx, grad):
        a, y, weight = ctx.saved_tensors
        g = incoming(grad, ctx.reduction, a.numel())
        if weight is not None:
            g = g * weight
        need_a, need_y = ctx.needs_input_grad[:2]
        grad_a = g * (a - y) / (a * (1 - a)).clamp_min(1e-12) if need_a else None
        grad_y = -g * torch.logit(a) if need_y else None
        return grad_a, grad_y, None, None


@direct_backward
class BinaryCrossEntropyWithLogits(torch.autograd.Function):
    """J = −w [p·y log σ(z) + (1 − y) log(1 − σ(z))]   (p = pos_weight, 1 if None).

    δ = ∂J/∂z = w [σ(z) (p·y + 1 − y) − p·y] · g, which is w (σ(z) − y) · g without pos_weight
    ∂J/∂y = w [log σ(−z) − p log σ(z)] · g
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z, y, weight, pos_weight, reduction):
        return F.binary_cross_entropy_with_logits(z, y, weight, reduction=reduction, pos_weight=pos_weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, y, weight, pos_weight, ctx.reduction = inputs
        ctx.save_for_backward(z, y, weight, pos_weight)

    @staticmethod
    @without_autocast
    def backward(ctx, grad):
        z, y, weight, pos_weight = ctx.saved_tensors
        g = incoming(grad, ctx.reduction, z.numel())
        if weight is not None:
            g = g * weight
        need_z, need_y = ctx.needs_input_grad[:2]
        grad_z = grad_y = None
        if pos_weight is None:
            if need_z:
                grad_z = g * (torch.sigmoid(z) - y)
            if need_y:
                grad_y = -g * z
        else:
            py = pos_weight * y
            if need_z:
                grad_z = g * (torch.sigmoid(z) * (py + 1 - y) - py)
            if need_y:
                grad_y = g * (F.logsigmoid(-z) - pos_weight * F.logsigmoid(z))
        return grad_z, grad_y, None, None, None


def class_dim(z: torch.Tensor) -> int:
    return 0 if z.dim() == 1 else 1


def picked_targets(z, target, weight, ignore_index):
    """Class indices without label smoothing, the notes' case: each sample's target class
    as an index into z's class dimension, whether it is kept (not ignore_index), and its
    weight w_{yₙ} (0 where ignored). The "mean" denominator is Σₙ w_{yₙ} (torch's nll_loss rule)."""
    dim = class_dim(z)
    kept = target != ignore_index
    index = torch.where(kept, target, 0).long()
    w_y = kept.to(z.dtype) if weight is None else torch.where(kept, weight[index], 0.0)
    return index.unsqueeze(dim), kept, w_y


def soft_targets(z, target, weight, ignore_index, label_smoothing):
    """The notes' y as a distribution q over classes, shaped like z, with the class
    weights and label smoothing folded in, plus the "mean" denominator.

    class indices:  q = w_c ((1 − ε) onehot(y) + ε / C), zero where y == ignore_index;
                    denominator Σₙ w_{yₙ} over the kept samples (torch's nll_loss rule)
    probabilities:  q = w_c ((1 − ε) y + ε / C);  denominator N (samples)
    """
    dim = class_dim(z)
    num_classes = z.shape[dim]
    w = None if weight is None else weight.reshape((num_classes,) + (1,) * (z.dim() - dim - 1))
    if target.is_floating_point():  # probabilities, shaped like z
        q = target * (1 - label_smoothing) + label_smoothing / num_classes if label_smoothing else target
        q = q if w is None else q * w
        return q, z.numel() // max(num_classes, 1)  # an int: no host-to-device copy
    index, kept, w_y = picked_targets(z, target, weight, ignore_index)
    onehot = torch.zeros_like(z).scatter(dim, index, 1.0)
    q = onehot * (1 - label_smoothing) + label_smoothing / num_classes
    q = q if w is None else q * w
    return torch.where(kept.unsqueeze(dim), q, 0.0), w_y.sum()


def _mean_scale(grad, denominator):
    """g / denominator for reduction="mean". With every target ignored the loss is 0/0 = nan
    (as torch) but its gradient is 0 (as torch): divide by 1 there, not by 0."""
    if torch.is_tensor(denominator):
        return grad / torch.where(denominator == 0, 1, denominator)
    return grad / max(denominator, 1)


@direct_backward
class CrossEntropy(torch.autograd.Function):
    """J = −Σ_c q_c log softmax(z)_c per sample, q the target distribution.

    Class indices, no smoothing (the notes' case):  J = −w_y log p_y,  δ = w_y (p − onehot(y)) · g
    General (`soft_targets`):  δ = ∂J/∂z = (S p − q) · g,  p = softmax(z), S = Σ_c q_c
    (S = 1 without class weights: the notes' δ(L) = softmax(z) − y);
    for probability targets ∂J/∂y = −(1 − ε) w_c log p · g.
    g is the incoming gradient, divided by the denominator for reduction="mean".

    log p is returned as a second output and saved from there, so backward reads p = exp(log p)
    instead of computing softmax again, and double backward still sees p as a function of z:
    a gradient reaching log p (only in double backward) goes back through log-softmax's
    Jacobian, ∂/∂z = g_logp − p Σ_c g_logp.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z, target, weight, ignore_index, reduction, label_smoothing):
        dim = class_dim(z)
        logp = torch.log_softmax(z, dim)
        if not target.is_floating_point() and not label_smoothing:
            index, kept, w_y = picked_targets(z, target, weight, ignore_index)
            # where(): an ignored sample reads no log p, so a −inf logit gives no 0·(−inf).
            per_sample = -w_y * torch.where(kept, logp.gather(dim, index).squeeze(dim), 0.0)
            denominator = w_y.sum()
        else:
            q, denominator = soft_targets(z, target, weight, ignore_index, label_smoothing)
            per_sample = -(q * logp).sum(dim)
        loss = per_sample.sum() / denominator if reduction == "mean" else reduce(per_sample, reduction)
        return loss, logp

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, target, weight, ctx.ignore_index, ctx.reduction, ctx.label_smoothing = inputs
        _, logp = output
        ctx.set_materialize_grads(False)  # log p gets a gradient only in double backward
        ctx.save_for_backward(logp, target, weight)

    @staticmethod
    @without_autocast
    def backward(ctx, grad, grad_logp):
        logp, target, weight = ctx.saved_tensors
        dim = class_dim(logp)
        need_z, need_target = ctx.needs_input_grad[:2]
        p = logp.exp()
        grad_z = grad_target = None
        if grad is not None and not target.is_floating_point() and not ctx.label_smoothing:
            index, _, w_y = picked_targets(logp, target, weight, ctx.ignore_index)
            g = _mean_scale(grad, w_y.sum()) if ctx.reduction == "mean" else grad
            scale = (w_y * g).unsqueeze(dim)  # w_y · g per sample
            grad_z = (p * scale).scatter_add_(dim, index, -scale) if need_z else None  # in place: a new tensor
        elif grad is not None:
            q, denominator = soft_targets(logp, target, weight, ctx.ignore_index, ctx.label_smoothing)
            g = _mean_scale(grad, denominator) if ctx.reduction == "mean" else grad
            if ctx.reduction == "none":
                g = g.unsqueeze(dim)
            grad_z = (q.sum(dim, keepdim=True) * p - q) * g if need_z else None
            if need_target:
                w = 1.0 if weight is None else weight.reshape((-1,) + (1,) * (logp.dim() - dim - 1))
                grad_target = -(1 - ctx.label_smoothing) * w * logp * g
        if grad_logp is not None and need_z:
            through_logp = grad_logp - p * grad_logp.sum(dim, keepdim=True)
            grad_z = through_logp if grad_z is None else grad_z + through_logp
        return grad_z, grad_target, None, None, None, None
