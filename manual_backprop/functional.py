"""`torch.nn.functional`, with every gradient from our rules.

Same names, signatures and defaults as torch.nn.functional. Each function checks
its inputs (metadata only on the hot path; see `_checks`), casts them as autocast
would cast the stock op's (see `_amp`), and calls its rule in `manual_backprop.rules`.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.nn import _reduction

from manual_backprop import _checks, observe, rules
from manual_backprop._amp import autocast_inputs, autocast_on
from manual_backprop._checks import InputError, TargetIndexError, shape
from manual_backprop.rules._apply import apply_rule

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "elu",
    "gelu",
    "leaky_relu",
    "linear",
    "mse_loss",
    "relu",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "tanh",
    # norm branch: normalisation, dropout, the activations CNNs use
    "batch_norm",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "relu6",
    "hardtanh",
    "hardsigmoid",
    "hardswish",
    "mish",
    "prelu",
    # embedding and attention
    "embedding",
    "multi_head_attention_forward",
    "scaled_dot_product_attention",
    # recurrent
    "gru",
    "gru_cell",
    "lstm",
    "lstm_cell",
    "rnn_relu",
    "rnn_relu_cell",
    "rnn_tanh",
    "rnn_tanh_cell",
]


# ---------------------------------------------------------------- linear


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """z = a Wᵀ + b.  Input: (*, in_features); weight: (out, in); bias: (out,). Output: (*, out)."""
    w_shape = weight.shape  # one read of each shape on the hot path; the messages below only on failure
    if not (len(w_shape) == 2 and input.dim() != 0 and input.shape[-1] == w_shape[1]
            and (bias is None or bias.shape == w_shape[:1])):
        _linear_shape_error(input, weight, bias)
    if autocast_on():
        input, weight, bias = autocast_inputs("linear", input.device, input, weight, bias)
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        _checks.same_dtype("linear", input=input, weight=weight, bias=bias)
    return apply_rule(rules.Linear, input, weight, bias)


def _linear_shape_error(input, weight, bias) -> None:
    if weight.dim() != 2:
        raise InputError(f"linear: weight must be 2-D (out_features, in_features), got shape {shape(weight)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise InputError(
            f"linear: input's last dimension must equal in_features={weight.shape[1]}, "
            f"got input of shape {shape(input)} for weight of shape {shape(weight)}"
        )
    if bias is not None and shape(bias) != (weight.shape[0],):
        raise InputError(
            f"linear: bias must have shape ({weight.shape[0]},) to match weight {shape(weight)}, got {shape(bias)}"
        )


# ----------------------------------------------------------- activations


def _activate(op: str, rule, input: torch.Tensor, inplace: bool, *params) -> torch.Tensor:
    if autocast_on():
        (input,) = autocast_inputs(op, input.device, input)
    if inplace:
        z_before = input.clone() if rule.sigma_prime_from == "z" else None
        return apply_rule(rules.activations.InplaceElementwise, rule, input, z_before, *params)
    return apply_rule(rule, input, *params)


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    return _activate("sigmoid", rules.Sigmoid, input, False)


def tanh(input: torch.Tensor) -> torch.Tensor:
    return _activate("tanh", rules.Tanh, input, False)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return _activate("relu", rules.ReLU, input, inplace)


def leaky_relu(input: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False) -> torch.Tensor:
    return _activate("leaky_relu", rules.LeakyReLU, input, inplace, negative_slope)


def elu(input: torch.Tensor, alpha: float = 1.0, inplace: bool = False) -> torch.Tensor:
    return _activate("elu", rules.ELU, input, inplace, alpha)


def softplus(input: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    return _activate("softplus", rules.Softplus, input, False, beta, threshold)


def silu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return _activate("silu", rules.SiLU, input, inplace)


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if approximate not in ("none", "tanh"):
        raise InputError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _activate("gelu", rules.GELU, input, False, approximate)


def identity(input: torch.Tensor) -> torch.Tensor:
    return _activate("identity", rules.Identity, input, False)


def softmax(
    input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> torch.Tensor:
    if dim is None:
        dim = torch.nn.functional._get_softmax_dim("softmax", input.dim(), _stacklevel)
    if not -max(input.dim(), 1) <= dim < max(input.dim(), 1):
        raise InputError(f"softmax: dim={dim} is out of range for input of shape {shape(input)}")
    if dtype is not None:
        input = input.to(dtype)
    else:
        (input,) = autocast_inputs("softmax", input.device, input)
    return apply_rule(rules.Softmax, input, dim)


# ---------------------------------------------------------------- losses


def _reduction_of(op: str, size_average, reduce, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction not in ("none", "mean", "sum"):
        raise InputError(f"{op}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return reduction


def _constant(op: str, **tensors: torch.Tensor | None) -> None:
    """Weights are constants in our rules (torch's own kernels do not differentiate them either)."""
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise InputError(f"{op}: {name} requires grad, but the rule treats it as a constant")


def _broadcastable(op: str, what: str, a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise InputError(
            f"{op}: {what}: {a_name} of shape {shape(a)} and {b_name} of shape {shape(b)} do not broadcast"
        ) from None


def mse_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    reduction = _reduction_of("mse_loss", size_average, reduce, reduction)
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=2,
        )
        _broadcastable("mse_loss", "sizes differ", input, target, "input", "target")
    if weight is not None and weight.size() != input.size():
        raise InputError(f"mse_loss: weight must have the input's shape {shape(input)}, got {shape(weight)}")
    _constant("mse_loss", weight=weight)
    input, target, weight = autocast_inputs("mse_loss", input.device, input, target, weight)
    _checks.floating("mse_loss", "input", input)
    input, target, weight = _checks.promote(input, target, weight)  # torch promotes here
    return apply_rule(rules.MSELoss, input, target, weight, reduction)


def binary_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    reduction = _reduction_of("binary_cross_entropy", size_average, reduce, reduction)
    if target.size() != input.size():
        raise InputError(
            f"binary_cross_entropy: target shape {shape(target)} must equal input shape {shape(input)}"
        )
    if weight is not None:
        _broadcastable("binary_cross_entropy", "weight", weight, input, "weight", "input")
        weight = weight.expand(torch.broadcast_shapes(weight.shape, input.shape))
    _constant("binary_cross_entropy", weight=weight)
    input, target, weight = autocast_inputs("binary_cross_entropy", input.device, input, target, weight)
    _checks.floating("binary_cross_entropy", "input", input)
    _checks.same_dtype("binary_cross_entropy", input=input, target=target)  # torch refuses to mix these
    (weight,) = _checks.promote(weight, to=input.dtype)  # and casts the weight
    _checks.check_values(
        "binary_cross_entropy",
        input.detach(),
        lambda p: (p >= 0) & (p <= 1),
        "input probabilities must lie in [0, 1]",
        within=(0, 1),
    )
    return apply_rule(rules.BinaryCrossEntropy, input, target, weight, reduction)


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    op = "binary_cross_entropy_with_logits"
    reduction = _reduction_of(op, size_average, reduce, reduction)
    if target.size() != input.size():
        raise InputError(f"{op}: target shape {shape(target)} must equal input shape {shape(input)}")
    for name, w in (("weight", weight), ("pos_weight", pos_weight)):
        if w is not None:
            _broadcastable(op, name, w, input, name, "input")
    _constant(op, weight=weight, pos_weight=pos_weight)
    input, target, weight, pos_weight = autocast_inputs(op, input.device, input, target, weight, pos_weight)
    _checks.floating(op, "input", input)
    input, target = _checks.promote(input, target)  # torch promotes input and target
    weight, pos_weight = _checks.promote(weight, pos_weight, to=input.dtype)
    return apply_rule(rules.BinaryCrossEntropyWithLogits, input, target, weight, pos_weight, reduction)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Input: (C), (N, C) or (N, C, d1, ...) logits. Target: class indices of shape (), (N) or
    (N, d1, ...), or class probabilities shaped like input."""
    op = "cross_entropy"
    reduction = _reduction_of(op, size_average, reduce, reduction)
    if input.dim() == 0:
        raise InputError(f"{op}: input must have a class dimension, got a 0-d tensor")
    if not 0.0 <= label_smoothing <= 1.0:
        raise InputError(f"{op}: label_smoothing must lie in [0, 1], got {label_smoothing}")
    dim = rules.losses.class_dim(input)
    num_classes = input.shape[dim]
    if weight is not None and shape(weight) != (num_classes,):
        raise InputError(f"{op}: weight must have shape ({num_classes},) for {num_classes} classes, got {shape(weight)}")
    _constant(op, weight=weight)
    if target.is_floating_point():
        if ignore_index != -100:  # torch refuses it for probability targets too
            raise InputError(f"{op}: ignore_index is not supported for floating point target (got ignore_index={ignore_index})")
        if target.shape != input.shape:
            raise InputError(
                f"{op}: probability targets must have the input's shape {shape(input)}, got {shape(target)}"
            )
    else:
        if target.dtype not in (torch.int64, torch.uint8):
            raise InputError(f"{op}: class-index targets must be int64 (or uint8), got dtype {target.dtype}")
        expected = shape(input)[:dim] + shape(input)[dim + 1 :]
        if shape(target) != expected:
            raise InputError(
                f"{op}: class-index target must have shape {expected} for input of shape {shape(input)}, "
                f"got {shape(target)}"
            )
        _checks.check_values(
            op,
            target,
            lambda t: ((t >= 0) & (t < num_classes)) | (t == ignore_index),
            f"class indices must lie in [0, {num_classes}) or equal ignore_index={ignore_index}",
            error=TargetIndexError,
            within=(0, num_classes - 1),
        )
    if target.is_floating_point():
        input, target, weight = autocast_inputs(op, input.device, input, target, weight)
        input, target, weight = _checks.promote(input, target, weight)  # torch promotes here
    else:
        input, weight = autocast_inputs(op, input.device, input, weight)
        _checks.same_dtype(op, input=input, weight=weight)  # torch refuses to mix these
    _checks.floating(op, "input", input)
    loss, _ = apply_rule(rules.CrossEntropy, input, target, weight, ignore_index, reduction, label_smoothing)
    return loss


# ---------------------------------------------------------- normalisation (norm branch)


def _norm_param_dtypes(op: str, input: torch.Tensor, **params: torch.Tensor | None) -> None:
    """γ, β (and running statistics) share the input's dtype, or are float32 beside a bf16/fp16 input
    (torch's mixed-dtype normalisation kernels; what autocast leaves on CPU)."""
    low = input.dtype in (torch.float16, torch.bfloat16)
    for name, t in params.items():
        if t is not None and t.dtype != input.dtype and not (low and t.dtype == torch.float32):
            described = ", ".join(f"{n}={p.dtype}" for n, p in params.items() if p is not None)
            raise InputError(f"{op}: mixed dtypes: input={input.dtype}, {described}; parameters must be "
                             "the input's dtype (or float32 beside a bfloat16/float16 input)")


def _per_channel(op: str, num_channels: int, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.numel() != num_channels:
            raise InputError(f"{op}: {name} should contain {num_channels} elements not {t.numel()} "
                             f"(shape {shape(t)})")


def _verify_batch_size(size) -> None:
    values_per_channel = size[0]
    for s in size[2:]:
        values_per_channel *= s
    if values_per_channel == 1:
        raise InputError(f"Expected more than 1 value per channel when training, got input size {torch.Size(size)}")


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Input: (N, C, *). Training: batch statistics, and the running ones updated in place
    (running ← (1 − momentum)·running + momentum·batch, with the unbiased batch variance), as torch.
    Eval: the running statistics, a per-channel affine map."""
    op = "batch_norm"
    if input.dim() < 2:
        raise InputError(f"{op}: expected input of shape (N, C, *) with at least 2 dims, got {shape(input)}")
    if training:
        _verify_batch_size(input.shape)
        if eps <= 0.0:
            raise InputError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise InputError(f"batch_norm eps must be non-negative, but got {eps}")
    elif running_mean is None or running_var is None:
        raise InputError(f"{op}: running_mean must be defined in evaluation mode")
    num_channels = input.shape[1]
    _per_channel(op, num_channels, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    _constant(op, running_mean=running_mean, running_var=running_var)
    input, weight, bias = autocast_inputs(op, input.device, input, weight, bias)
    _norm_param_dtypes(op, input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    if weight is not None and weight.dim() != 1:  # torch takes any shape with C elements
        weight = weight.reshape(-1)
    if bias is not None and bias.dim() != 1:
        bias = bias.reshape(-1)
    if not training:
        return apply_rule(
            rules.BatchNormEval, input, running_mean.reshape(-1), running_var.reshape(-1), weight, bias, eps
        )
    output, mean, var = apply_rule(rules.BatchNorm, input, weight, bias, eps)
    n = input.numel() // max(num_channels, 1)  # values per channel
    if n > 0:  # a no-grad side effect, not part of the gradient (torch skips empty batches too)
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.reshape(running_mean.shape), alpha=momentum)
            if running_var is not None:
                unbiased = var.reshape(running_var.shape) * (n / (n - 1))
                running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    return output


def _normalized_shape(normalized_shape) -> tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def _check_normalized_shape(op: str, input, normalized_shape, **params) -> None:
    k = len(normalized_shape)
    if k == 0:
        raise InputError(f"{op}: normalized_shape must have at least one dimension, got {normalized_shape}")
    if input.dim() < k or shape(input)[input.dim() - k :] != normalized_shape:
        raise InputError(
            f"{op}: Given normalized_shape={list(normalized_shape)}, expected input with shape "
            f"[*, {', '.join(map(str, normalized_shape))}], but got input of size{list(input.shape)}"
        )
    for name, t in params.items():
        if t is not None and shape(t) != normalized_shape:
            raise InputError(f"{op}: expected {name} of shape {normalized_shape}, got {shape(t)}")


def layer_norm(
    input: torch.Tensor,
    normalized_shape: list[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Input: (*, *normalized_shape); weight, bias: normalized_shape. Output: like input."""
    normalized_shape = _normalized_shape(normalized_shape)
    _check_normalized_shape("layer_norm", input, normalized_shape, weight=weight, bias=bias)
    input, weight, bias = autocast_inputs("layer_norm", input.device, input, weight, bias)
    _norm_param_dtypes("layer_norm", input, weight=weight, bias=bias)
    output, _, _ = apply_rule(rules.LayerNorm, input, normalized_shape, weight, bias, eps)
    return output


def rms_norm(
    input: torch.Tensor,
    normalized_shape: list[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """Input: (*, *normalized_shape); weight: normalized_shape. eps=None: the machine epsilon of the
    dtype the statistics are computed in (float32 for bf16/fp16 inputs), as torch."""
    normalized_shape = _normalized_shape(normalized_shape)
    _check_normalized_shape("rms_norm", input, normalized_shape, weight=weight)
    input, weight = autocast_inputs("rms_norm", input.device, input, weight)
    _norm_param_dtypes("rms_norm", input, weight=weight)
    if eps is None:
        eps = torch.finfo(rules.norm.opmath(input).dtype if input.is_floating_point() else torch.float32).eps
    output, _ = apply_rule(rules.RMSNorm, input, normalized_shape, weight, eps)
    return output


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Input: (N, C, *), C divisible by num_groups; weight, bias: (C,). Output: like input."""
    op = "group_norm"
    if input.dim() < 2:
        raise InputError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    num_channels = input.shape[1]
    if num_groups <= 0 or num_channels % num_groups:
        raise InputError(
            "Expected number of channels in input to be divisible by num_groups, but got input of shape "
            f"{list(input.shape)} and num_groups={num_groups}"
        )
    _verify_batch_size([input.shape[0] * num_channels // num_groups, num_groups, *input.shape[2:]])
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and shape(t) != (num_channels,):
            raise InputError(f"{op}: expected {name} of shape ({num_channels},), got {shape(t)}")
    input, weight, bias = autocast_inputs(op, input.device, input, weight, bias)
    _norm_param_dtypes(op, input, weight=weight, bias=bias)
    output, _, _ = apply_rule(rules.GroupNorm, input, num_groups, weight, bias, eps)
    return output


# ---------------------------------------------------------------- dropout (norm branch)


def _dropout(input: torch.Tensor, p: float, training: bool, inplace: bool, mask_shape) -> torch.Tensor:
    """Draw the mask as torch's CPU kernel does (bernoulli_(1 − p) on the mask's shape), then the rule.

    Eval, p = 0 and empty inputs return the input itself, no graph node (as torch)."""
    if p < 0.0 or p > 1.0:
        raise InputError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0 or input.numel() == 0:
        return input
    if p == 1:  # torch draws nothing here: the input times zero
        mask = torch.zeros(mask_shape, dtype=torch.bool, device=input.device)
    elif tuple(mask_shape) == tuple(input.shape):  # empty_like keeps the input's strides, as torch's kernel does,
        mask = torch.empty_like(input, dtype=torch.bool).bernoulli_(1 - p)  # so a non-contiguous input gets its mask
    else:
        mask = torch.empty(mask_shape, dtype=torch.bool, device=input.device).bernoulli_(1 - p)
    if inplace:
        return apply_rule(rules.dropout.InplaceDropout, input, mask, p)
    return apply_rule(rules.Dropout, input, mask, p)


def _feature_mask_shape(input: torch.Tensor, batched: bool = True) -> tuple[int, ...]:
    """One mask value per channel: (N, C, 1, …), or (C, 1, …) for an unbatched input."""
    if not batched:
        return (input.shape[0],) + (1,) * (input.dim() - 1)
    if input.dim() < 2:
        raise InputError(f"Feature dropout requires at least 2 dimensions in the input, got {shape(input)}")
    return tuple(input.shape[:2]) + (1,) * (input.dim() - 2)


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """a = z ⊙ m / (1 − p), m ~ Bernoulli(1 − p) per element."""
    return _dropout(input, p, training, inplace, input.shape)


def dropout1d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Whole channels dropped. Input: (N, C, L) or (C, L)."""
    if p < 0.0 or p > 1.0:
        raise InputError(f"dropout probability has to be between 0 and 1, but got {p}")
    if input.dim() not in (2, 3):
        raise InputError(
            f"dropout1d: Expected 2D or 3D input, but received a {input.dim()}D input. "
            "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
            "spatial dimension, a channel dimension, and an optional batch dimension "
            "(i.e. 2D or 3D inputs)."
        )
    return _dropout(input, p, training, inplace, _feature_mask_shape(input, input.dim() == 3))


def dropout2d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Whole channels dropped. Input: (N, C, H, W) (a 3-D input is taken as (N, C, L), as torch)."""
    if p < 0.0 or p > 1.0:
        raise InputError(f"dropout probability has to be between 0 and 1, but got {p}")
    if input.dim() not in (3, 4):
        warnings.warn(
            f"dropout2d: Received a {input.dim()}-D input to dropout2d, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            "and silence this warning, please use dropout instead. Note that dropout2d "
            "exists to provide channel-wise dropout on inputs with 2 spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. 3D or 4D inputs).",
            stacklevel=2,
        )
    if input.dim() == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
            "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
            "is the channel dim. This behavior will change in a future release to interpret the "
            "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
            "channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=2,
        )
    return _dropout(input, p, training, inplace, _feature_mask_shape(input))


def dropout3d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Whole channels dropped. Input: (N, C, D, H, W) or (C, D, H, W)."""
    if p < 0.0 or p > 1.0:
        raise InputError(f"dropout probability has to be between 0 and 1, but got {p}")
    if input.dim() not in (4, 5):
        warnings.warn(
            f"dropout3d: Received a {input.dim()}-D input to dropout3d, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            "and silence this warning, please use dropout instead. Note that dropout3d "
            "exists to provide channel-wise dropout on inputs with 3 spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. 4D or 5D inputs).",
            stacklevel=2,
        )
    return _dropout(input, p, training, inplace, _feature_mask_shape(input, input.dim() == 5))


# ------------------------------------------- activations torchvision's CNNs use (norm branch)


def relu6(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return _activate("relu6", rules.ReLU6, input, inplace)


def hardtanh(input: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> torch.Tensor:
    if min_val > max_val:
        raise InputError(f"hardtanh: min_val cannot be greater than max_val, got min_val={min_val}, max_val={max_val}")
    return _activate("hardtanh", rules.Hardtanh, input, inplace, min_val, max_val)


def hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return _activate("hardsigmoid", rules.Hardsigmoid, input, inplace)


def hardswish(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return _activate("hardswish", rules.Hardswish, input, inplace)


def mish(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return _activate("mish", rules.Mish, input, inplace)


def prelu(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """a = z for z > 0, α z otherwise; weight: 1 slope, or one per channel (input's dim 1)."""
    channels = input.shape[1] if input.dim() >= 2 else 1
    if weight.numel() != 1 and weight.numel() != channels:
        raise InputError(
            "Mismatch of parameter numbers and input channel size. Found parameter numbers = "
            f"{weight.numel()} and channel size = {channels}."
        )
    input, weight = autocast_inputs("prelu", input.device, input, weight)
    if input.dtype != weight.dtype:
        _checks.same_dtype("prelu", input=input, weight=weight)
    return apply_rule(rules.PReLU, input, weight)
# ------------------------------------------------- convolution and pooling (issue 8)


def _ntuple(op: str, name: str, value, d: int) -> tuple[int, ...]:
    """An int or a sequence of 1 or d ints → d ints (torch expands a single value the same way)."""
    if isinstance(value, int):
        return (value,) * d
    value = tuple(value)
    if len(value) == 1:
        return value * d
    if len(value) != d or not all(isinstance(v, int) for v in value):
        raise InputError(f"{op}: {name} must be an int or a tuple of {d} ints, got {value}")
    return value


def _spatial_input(op: str, input: torch.Tensor, d: int) -> None:
    if input.dim() not in (d + 1, d + 2):
        raise InputError(
            f"{op}: Expected {d + 1}D (unbatched) or {d + 2}D (batched) input to {op}, "
            f"but got input of size: {list(input.shape)}"
        )


def _conv_checks(op: str, d: int, input, weight, bias, stride, dilation, groups, transposed: bool) -> None:
    if weight.dim() != d + 2:
        raise InputError(f"{op}: weight must be {d + 2}-D, got weight of size {list(weight.shape)}")
    _spatial_input(op, input, d)
    if any(s <= 0 for s in stride):
        raise InputError(f"{op}: non-positive stride is not supported, got stride={stride}")
    if any(s <= 0 for s in dilation):
        raise InputError(f"{op}: dilation should be greater than zero, got dilation={dilation}")
    if groups <= 0:
        raise InputError(f"{op}: non-positive groups is not supported, got groups={groups}")
    if weight.shape[0] % groups:
        raise InputError(
            f"{op}: Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
            f"but got weight of size {list(weight.shape)} instead"
        )
    channels = input.shape[-d - 1]
    expected = weight.shape[0] if transposed else weight.shape[1] * groups
    if channels != expected:
        given = "transposed=1" if transposed else f"groups={groups}"
        raise InputError(
            f"{op}: Given {given}, weight of size {list(weight.shape)}, expected input{list(input.shape)} "
            f"to have {expected} channels, but got {channels} channels instead"
        )
    out_channels = weight.shape[1] * groups if transposed else weight.shape[0]
    if bias is not None and shape(bias) != (out_channels,):
        raise InputError(
            f"{op}: Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with "
            f"{out_channels} elements, but got bias of size {list(bias.shape)} instead"
        )


def _conv(op: str, d: int, input, weight, bias, stride, padding, dilation, groups, rule=None, rule_args=()) -> torch.Tensor:
    stride, dilation = _ntuple(op, "stride", stride, d), _ntuple(op, "dilation", dilation, d)
    _conv_checks(op, d, input, weight, bias, stride, dilation, groups, transposed=False)
    kernel = tuple(weight.shape[2:])
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * d
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise InputError(f"{op}: padding='same' is not supported for strided convolutions")
            padding, right = rules.conv.same_padding(kernel, dilation)
            extra = [r - p for p, r in zip(padding, right)]  # an even d(k−1): torch pads the odd one on the right
            if any(extra):
                input = pad(input, [x for e in reversed(extra) for x in (0, e)])
            padding = tuple(padding)
        else:
            raise InputError(f"{op}: Invalid padding string {padding!r}, should be one of ['valid', 'same']")
    else:
        padding = _ntuple(op, "padding", padding, d)
        if any(p < 0 for p in padding):
            raise InputError(f"{op}: negative padding is not supported, got padding={padding}")
    padded = [n + 2 * p for n, p in zip(input.shape[-d:], padding)]
    effective = [dil * (k - 1) + 1 for k, dil in zip(kernel, dilation)]
    if any(n < k for n, k in zip(padded, effective)):
        raise InputError(
            f"{op}: Calculated padded input size per channel: ({' x '.join(map(str, padded))}). "
            f"Kernel size: ({' x '.join(map(str, effective))}). Kernel size can't be greater than actual input size"
        )
    input, weight, bias = autocast_inputs(op, input.device, input, weight, bias)
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        _checks.same_dtype(op, input=input, weight=weight, bias=bias)
    # rule, rule_args: a learning-rule plugin's convolution rule and its arguments after groups
    return apply_rule(rule or rules.Convolution, input, weight, bias, stride, padding, dilation, groups, *rule_args)


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """z = W ⋆ a + b.  Input: (N, C_in, L) or (C_in, L); weight: (C_out, C_in/groups, k). Output: (N, C_out, L_out)."""
    return _conv("conv1d", 1, input, weight, bias, stride, padding, dilation, groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """z = W ⋆ a + b.  Input: (N, C_in, H, W) or (C_in, H, W); weight: (C_out, C_in/groups, kH, kW)."""
    return _conv("conv2d", 2, input, weight, bias, stride, padding, dilation, groups)


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """z = W ⋆ a + b.  Input: (N, C_in, D, H, W) or (C_in, D, H, W); weight: (C_out, C_in/groups, kD, kH, kW)."""
    return _conv("conv3d", 3, input, weight, bias, stride, padding, dilation, groups)


def _conv_transpose(op: str, d: int, input, weight, bias, stride, padding, output_padding, groups, dilation):
    if isinstance(padding, str):
        raise InputError(f"{op}: padding must be an int or a tuple of ints, got {padding!r} "
                         "('same' and 'valid' are for convolutions, not transposed ones)")
    stride, dilation = _ntuple(op, "stride", stride, d), _ntuple(op, "dilation", dilation, d)
    padding, output_padding = _ntuple(op, "padding", padding, d), _ntuple(op, "output_padding", output_padding, d)
    _conv_checks(op, d, input, weight, bias, stride, dilation, groups, transposed=True)
    if any(op_ >= s and op_ >= dil for op_, s, dil in zip(output_padding, stride, dilation)):
        raise InputError(f"{op}: output padding must be smaller than either stride or dilation, but got "
                         f"output_padding={output_padding}, stride={stride}, dilation={dilation}")
    out = [(n - 1) * s - 2 * p + dil * (k - 1) + op_ + 1 for n, s, p, dil, k, op_ in
           zip(input.shape[-d:], stride, padding, dilation, weight.shape[2:], output_padding)]
    if any(n <= 0 for n in out):
        raise InputError(f"{op}: Given input size per channel: ({' x '.join(map(str, input.shape[-d:]))}). "
                         f"Calculated output size per channel: ({' x '.join(map(str, out))}). Output size is too small")
    input, weight, bias = autocast_inputs(op, input.device, input, weight, bias)
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        _checks.same_dtype(op, input=input, weight=weight, bias=bias)
    return apply_rule(rules.ConvTranspose, input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """z = Wᵀ ⋆ a + b.  Input: (N, C_in, L) or (C_in, L); weight: (C_in, C_out/groups, k)."""
    return _conv_transpose("conv_transpose1d", 1, input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """z = Wᵀ ⋆ a + b.  Input: (N, C_in, H, W) or (C_in, H, W); weight: (C_in, C_out/groups, kH, kW)."""
    return _conv_transpose("conv_transpose2d", 2, input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """z = Wᵀ ⋆ a + b.  Input: (N, C_in, D, H, W) or (C_in, D, H, W); weight: (C_in, C_out/groups, kD, kH, kW)."""
    return _conv_transpose("conv_transpose3d", 3, input, weight, bias, stride, padding, output_padding, groups, dilation)


_PAD_MODES = ("constant", "reflect", "replicate", "circular")


def pad(input: torch.Tensor, pad: list[int], mode: str = "constant", value: float | None = None) -> torch.Tensor:
    """Pad the last len(pad)/2 dimensions (pad lists the last dimension first: left, right, ...)."""
    if mode not in _PAD_MODES:
        raise InputError(f"pad: mode must be one of {list(_PAD_MODES)}, got {mode!r}")
    pad = tuple(int(p) for p in pad)
    if len(pad) % 2:
        raise InputError(f"pad: Padding length must be divisible by 2, got pad={list(pad)}")
    if len(pad) // 2 > input.dim():
        raise InputError(f"pad: Padding length should be less than or equal to two times the input dimension "
                         f"but got padding length {len(pad)} and input of dimension {input.dim()}")
    if mode != "constant" and value is not None and value != 0:
        raise InputError(f'pad: Padding mode "{mode}" doesn\'t take in value argument')
    if mode in ("reflect", "replicate"):
        # autocast's names for the aten kernels F.pad dispatches to (circular is composite, not listed)
        op = f"{'reflection' if mode == 'reflect' else 'replication'}_pad{len(pad) // 2}d"
        (input,) = autocast_inputs(op, input.device, input)
    if mode != "constant":
        value = None
    return apply_rule(rules.Pad, input, pad, mode, value)


def _pool_args(op: str, d: int, input, kernel_size, stride, padding):
    _spatial_input(op, input, d)
    kernel_size = _ntuple(op, "kernel_size", kernel_size, d)
    stride = kernel_size if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _ntuple(op, "stride", stride, d)
    return kernel_size, stride, _ntuple(op, "padding", padding, d)


def _max_pool(op, d, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    kernel_size, stride, padding = _pool_args(op, d, input, kernel_size, stride, padding)
    dilation = _ntuple(op, "dilation", dilation, d)
    # autocast lists max_pool3d (fp32 on cpu), not max_pool3d_with_indices
    (input,) = autocast_inputs(op + ("_with_indices" if return_indices else ""), input.device, input)
    z, indices = apply_rule(rules.MaxPool, input, kernel_size, stride, padding, dilation, ceil_mode)
    return (z, indices) if return_indices else z


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """z = max over each window.  Input: (N, C, L) or (C, L). With return_indices, also the argmax."""
    return _max_pool("max_pool1d", 1, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """z = max over each window.  Input: (N, C, H, W) or (C, H, W). With return_indices, also the argmax."""
    return _max_pool("max_pool2d", 2, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool3d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """z = max over each window.  Input: (N, C, D, H, W) or (C, D, H, W). With return_indices, also the argmax."""
    return _max_pool("max_pool3d", 3, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def _avg_pool(op, d, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    kernel_size, stride, padding = _pool_args(op, d, input, kernel_size, stride, padding)
    (input,) = autocast_inputs(op, input.device, input)
    return apply_rule(rules.AvgPool, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """z = mean over each window.  Input: (N, C, L) or (C, L)."""
    return _avg_pool("avg_pool1d", 1, input, kernel_size, stride, padding, ceil_mode, count_include_pad, None)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    """z = Σ window / divisor.  Input: (N, C, H, W) or (C, H, W)."""
    return _avg_pool("avg_pool2d", 2, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def avg_pool3d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    """z = Σ window / divisor.  Input: (N, C, D, H, W) or (C, D, H, W)."""
    return _avg_pool("avg_pool3d", 3, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _adaptive_size(op: str, d: int, input, output_size) -> tuple[int, ...]:
    _spatial_input(op, input, d)
    if isinstance(output_size, int):
        output_size = (output_size,) * d
    output_size = tuple(output_size)
    if len(output_size) == 1 and d > 1:
        output_size = output_size * d
    if len(output_size) != d:
        raise InputError(f"{op}: output_size must be an int or a tuple of {d} ints (or None), got {output_size}")
    return tuple(n if o is None else int(o) for n, o in zip(input.shape[-d:], output_size))


def adaptive_avg_pool1d(input, output_size) -> torch.Tensor:
    """z = mean over each of output_size windows.  Input: (N, C, L) or (C, L)."""
    size = _adaptive_size("adaptive_avg_pool1d", 1, input, output_size)
    return apply_rule(rules.AdaptiveAvgPool, input, size)


def adaptive_avg_pool2d(input: torch.Tensor, output_size) -> torch.Tensor:
    """z = mean over each of output_size windows.  Input: (N, C, H, W) or (C, H, W)."""
    size = _adaptive_size("adaptive_avg_pool2d", 2, input, output_size)
    return apply_rule(rules.AdaptiveAvgPool, input, size)


def adaptive_avg_pool3d(input: torch.Tensor, output_size) -> torch.Tensor:
    """z = mean over each of output_size windows.  Input: (N, C, D, H, W) or (C, D, H, W)."""
    size = _adaptive_size("adaptive_avg_pool3d", 3, input, output_size)
    (input,) = autocast_inputs("adaptive_avg_pool3d", input.device, input)
    return apply_rule(rules.AdaptiveAvgPool, input, size)


def _adaptive_max_pool(op, d, input, output_size, return_indices):
    size = _adaptive_size(op, d, input, output_size)
    (input,) = autocast_inputs(op, input.device, input)
    z, indices = apply_rule(rules.AdaptiveMaxPool, input, size)
    return (z, indices) if return_indices else z


def adaptive_max_pool1d(input, output_size, return_indices=False):
    """z = max over each of output_size windows.  Input: (N, C, L) or (C, L)."""
    return _adaptive_max_pool("adaptive_max_pool1d", 1, input, output_size, return_indices)


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """z = max over each of output_size windows.  Input: (N, C, H, W) or (C, H, W)."""
    return _adaptive_max_pool("adaptive_max_pool2d", 2, input, output_size, return_indices)


def adaptive_max_pool3d(input, output_size, return_indices=False):
    """z = max over each of output_size windows.  Input: (N, C, D, H, W) or (C, D, H, W)."""
    return _adaptive_max_pool("adaptive_max_pool3d", 3, input, output_size, return_indices)


__all__ += [
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "pad",
]
# -------------------------------------------------------------- embedding


def embedding(
    input: torch.Tensor,
    weight: torch.Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    """z = E[x].  Input: (*) integer indices; weight: (num_embeddings, embedding_dim). Output: (*, embedding_dim).

    max_norm renormalises the rows looked up, in place and without gradient, as torch does.
    """
    op = "embedding"
    if weight.dim() != 2:
        raise InputError(f"{op}: weight must be 2-D (num_embeddings, embedding_dim), got shape {shape(weight)}")
    if input.dtype not in (torch.int64, torch.int32):
        raise InputError(f"{op}: indices must be int64 or int32, got dtype {input.dtype}")
    if sparse:
        raise InputError(
            f"{op}: sparse=True (sparse weight gradients) is not supported by the manual rule; "
            "use sparse=False, or keep this embedding on stock autograd"
        )
    num_embeddings = weight.shape[0]
    if padding_idx is not None:
        if not -num_embeddings <= padding_idx < num_embeddings:
            raise InputError(f"{op}: padding_idx={padding_idx} must be within num_embeddings={num_embeddings}")
        padding_idx = padding_idx % num_embeddings
    _checks.check_values(
        op,
        input,
        lambda x: (x >= 0) & (x < num_embeddings),
        f"indices must lie in [0, {num_embeddings})",
        error=TargetIndexError,
        within=(0, num_embeddings - 1),
    )
    if max_norm is not None:
        input = input.contiguous()
        with torch.no_grad():
            torch.embedding_renorm_(weight, input, max_norm, norm_type)
    return apply_rule(rules.Embedding, input, weight, padding_idx, scale_grad_by_freq)


# -------------------------------------------------------------- attention


def attention_with_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    safe: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`scaled_dot_product_attention` that also returns the weights P = softmax(S) (after dropout, if any).

    Not in torch.nn.functional: MultiheadAttention's need_weights=True needs P, and a plain
    softmax there (`safe=False`) gives NaN for a fully masked row, as torch's does.
    """
    op = "scaled_dot_product_attention"
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise InputError(
            f"{op}: query, key and value must have at least 2 dimensions (*, L, E), got shapes "
            f"{shape(query)}, {shape(key)}, {shape(value)}"
        )
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise InputError(
            f"{op}: query (*, L, E), key (*, S, E) and value (*, S, Ev) disagree: got shapes "
            f"{shape(query)}, {shape(key)}, {shape(value)}"
        )
    if not 0.0 <= dropout_p <= 1.0:
        raise InputError(f"{op}: dropout_p must lie in [0, 1], got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise InputError(f"{op}: an explicit attn_mask should not be set when is_causal=True")
    groups = 1
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        heads_q, heads_kv = query.shape[-3], key.shape[-3]
        if key.dim() < 3 or value.shape[-3] != heads_kv or heads_kv == 0 or heads_q % heads_kv:
            raise InputError(
                f"{op}: enable_gqa needs the query heads ({heads_q}) to be a multiple of the key and value "
                f"heads, got shapes {shape(query)}, {shape(key)}, {shape(value)}"
            )
        groups = heads_q // heads_kv
    query, key, value, attn_mask = autocast_inputs(op, query.device, query, key, value, attn_mask)
    if not (query.dtype == key.dtype == value.dtype):
        _checks.same_dtype(op, query=query, key=key, value=value)
    _checks.floating(op, "query", query)
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, query.dtype):
        raise InputError(f"{op}: attn_mask must be bool or match the query's dtype {query.dtype}, got {attn_mask.dtype}")
    batch = query.shape[:-2] if groups == 1 else query.shape[:-3] + (query.shape[-3],)
    key_batch = key.shape[:-2] if groups == 1 else key.shape[:-3] + (query.shape[-3],)
    try:
        weights_shape = (*torch.broadcast_shapes(batch, key_batch), query.shape[-2], key.shape[-2])
        if attn_mask is not None:
            torch.broadcast_shapes(attn_mask.shape, weights_shape)
    except RuntimeError:
        raise InputError(
            f"{op}: shapes do not broadcast: query {shape(query)}, key {shape(key)}, value {shape(value)}"
            + ("" if attn_mask is None else f", attn_mask {shape(attn_mask)}")
        ) from None
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0
    keep = None
    if dropout_p > 0.0:  # drawn as torch's dropout draws it: bernoulli(1 − p) on a tensor shaped like P
        keep = torch.empty(weights_shape, dtype=query.dtype, device=query.device).bernoulli_(1 - dropout_p).bool()
    O, P = apply_rule(rules.Attention, query, key, value, attn_mask, keep, dropout_p, scale, is_causal, groups, safe)
    if keep is not None:  # the weights O was computed with, as torch returns them
        P = P * rules.dropout.scaled_mask(keep, dropout_p, P.dtype)
    return O, P


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """O = softmax(Q Kᵀ · scale + mask) V.  Query: (*, L, E); key: (*, S, E); value: (*, S, Ev). Output: (*, L, Ev).

    A query row that may attend to no key (fully masked) gives zeros, as torch does.
    """
    O, _ = attention_with_weights(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return O


def multi_head_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: torch.Tensor | None,
    in_proj_bias: torch.Tensor | None,
    bias_k: torch.Tensor | None,
    bias_v: torch.Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    training: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: torch.Tensor | None = None,
    k_proj_weight: torch.Tensor | None = None,
    v_proj_weight: torch.Tensor | None = None,
    static_k: torch.Tensor | None = None,
    static_v: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch's multi-head attention, on our linear and attention rules.  Query: (L, N, E) or (L, E);
    key, value: (S, N, E_k), (S, N, E_v). Output: (L, N, E), and the weights (N, L, S) averaged over
    heads (or (N, H, L, S)) when need_weights.

    Same steps and argument checks as torch.nn.functional.multi_head_attention_forward (its mask
    helpers are reused, so masks and errors are torch's): in-projection (z = a Wᵀ + b per head
    group), attention per head, out-projection.
    """
    TF = torch.nn.functional
    is_batched = TF._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    key_padding_mask = TF._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=TF._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise InputError(
            "multi_head_attention_forward: need attn_mask if specifying the is_causal hint "
            "(torch.nn.Transformer.generate_square_subsequent_mask makes one)"
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # the hint alone: attention applies the causal mask itself
    else:
        attn_mask = TF._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype,
            check_other=False,
        )
        if key_padding_mask is not None:
            is_causal = False  # merged with the padding mask, it is no longer causal
    if embed_dim != embed_dim_to_check:
        raise InputError(f"multi_head_attention_forward: expected embedding dimension {embed_dim_to_check}, got {embed_dim}")
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise InputError(f"multi_head_attention_forward: embed_dim {embed_dim} not divisible by num_heads {num_heads}")

    observe.samples_in(1)  # every Linear below sees (L, N, E): the samples lie along dim 1
    # in-projection: one Linear per packed weight block
    if not use_separate_proj_weight:
        W, b = in_proj_weight, in_proj_bias
        if key is value and query is key:  # self-attention: one product with the whole packed weight
            q, k, v = linear(query, W, b).chunk(3, dim=-1)
        elif key is value:
            W_q, W_kv = W.split([embed_dim, 2 * embed_dim])
            b_q, b_kv = (None, None) if b is None else b.split([embed_dim, 2 * embed_dim])
            q = linear(query, W_q, b_q)
            k, v = linear(key, W_kv, b_kv).chunk(2, dim=-1)
        else:
            b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
            W_q, W_k, W_v = W.chunk(3)
            q, k, v = linear(query, W_q, b_q), linear(key, W_k, b_k), linear(value, W_v, b_v)
    else:
        b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = linear(query, q_proj_weight, b_q), linear(key, k_proj_weight, b_k), linear(value, v_proj_weight, b_v)

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, key.shape[0]):
                raise InputError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, key.shape[0])}."
                )
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, key.shape[0]):
                raise InputError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                    f"{(bsz * num_heads, tgt_len, key.shape[0])}."
                )
        else:
            raise InputError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    pad = TF.pad
    if bias_k is not None and bias_v is not None:  # one learned key/value appended to every sequence
        if static_k is not None or static_v is not None:
            raise InputError("multi_head_attention_forward: bias cannot be added to static key or value")
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        attn_mask = None if attn_mask is None else pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else pad(key_padding_mask, (0, 1))
    elif (bias_k is None) != (bias_v is None):
        raise InputError("multi_head_attention_forward: bias_k and bias_v must both be set or both be None")

    # heads as views: (L, N, E) -> (N, H, L, E/H), no copy (static keys/values come as (N·H, S, E/H))
    def heads(t):
        return t.unflatten(-1, (num_heads, head_dim)).permute(1, 2, 0, 3)

    q = heads(q)
    k = heads(k) if static_k is None else static_k.view(bsz, num_heads, -1, head_dim)
    v = heads(v) if static_v is None else static_v.view(bsz, num_heads, -1, head_dim)
    if add_zero_attn:  # one all-zero key/value appended
        zeros = torch.zeros((bsz, num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros.to(v.dtype)], dim=2)
        attn_mask = None if attn_mask is None else pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else pad(key_padding_mask, (0, 1))
    src_len = k.shape[2]
    if attn_mask is not None:  # (1 or N·H, L, S) -> (1 or N, 1 or H, L, S)
        attn_mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.view(bsz, num_heads, -1, src_len)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, src_len):
            raise InputError(
                f"multi_head_attention_forward: key_padding_mask must have shape {(bsz, src_len)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0

    # attention per head; with need_weights a plain softmax, as torch (NaN for a fully masked row)
    attn_output, weights = attention_with_weights(
        q, k, v, attn_mask, dropout_p, is_causal and attn_mask is None, safe=not need_weights
    )
    attn_output = attn_output.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)  # (L, N, E): samples stay apart
    attn_output = linear(attn_output, out_proj_weight, out_proj_bias)
    if not need_weights:
        return (attn_output if is_batched else attn_output.squeeze(1)), None
    if average_attn_weights:
        weights = weights.mean(dim=1)
    if not is_batched:
        attn_output, weights = attn_output.squeeze(1), weights.squeeze(0)
    return attn_output, weights


# -------------------------------------------------------------- recurrent


def _recurrent_checks(op: str, x: torch.Tensor, h0: torch.Tensor, params: list, stride: int, layers: int, D: int):
    if len(params) != layers * D * stride:
        raise InputError(
            f"{op}: expected {layers * D * stride} parameter tensors ({layers} layer(s) × {D} direction(s) × "
            f"{stride}), got {len(params)}"
        )
    if h0.dim() != 3 or h0.shape[0] != layers * D:
        raise InputError(f"{op}: hx must have shape ({layers * D}, N, H) for {layers} layer(s) × {D} direction(s), "
                         f"got {shape(h0)}")
    if x.shape[-1] != params[0].shape[1]:
        raise InputError(f"{op}: input's last dimension must equal input_size={params[0].shape[1]}, "
                         f"got input of shape {shape(x)}")
    for p in params:
        if p.dtype != x.dtype:
            _checks.same_dtype(op, input=x, weight=p)


def _recurrent(op: str, input, batch_sizes, hx, params, has_biases, num_layers, dropout_p, train, bidirectional,
               batch_first, feedback=None):
    """Every layer and direction of torch's `_VF.<op>` on our rules (`rules.recurrent`): layer l + 1 reads
    layer l's output (both directions side by side), with dropout between layers drawn as torch draws it.
    feedback: None (backprop), or a learning rule's B for each weight in `params` (None for biases)."""
    lstm = op == "lstm"
    h0, c0 = hx if lstm else (hx, None)
    proj = lstm and h0.shape[-1] != c0.shape[-1]
    D, stride, params = 2 if bidirectional else 1, 2 + 2 * bool(has_biases) + proj, list(params)
    _recurrent_checks(op, input, h0, params, stride, num_layers, D)
    if batch_sizes is None:
        if input.dim() != 3:
            raise InputError(f"{op}: input must be 3-D (seq, batch, feature), got shape {shape(input)}")
        x = input.transpose(0, 1) if batch_first else input
        T, N = x.shape[:2]
        sizes, x = (N,) * T, x.reshape(T * N, x.shape[2])
    else:
        sizes, x = tuple(batch_sizes.tolist()), input
    if h0.shape[1] != sizes[0] or (lstm and c0.shape[:2] != h0.shape[:2]):
        raise InputError(f"{op}: hx must have batch size {sizes[0]}, got {shape(h0)}"
                         + (f" and {shape(c0)}" if lstm else ""))
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(D):
            k = layer * D + direction
            W_ih, W_hh, *rest = params[k * stride : (k + 1) * stride]
            b_ih, b_hh = rest[:2] if has_biases else (None, None)
            Bs = None if feedback is None else tuple(B for B in feedback[k * stride : (k + 1) * stride] if B is not None)
            name, reverse = f"_l{layer}" + ("_reverse" if direction else ""), direction == 1
            if lstm:
                out, h, c, _, _ = apply_rule(rules.LSTMLayer, x, h0[k], c0[k], W_ih, W_hh, b_ih, b_hh,
                                             rest[-1] if proj else None, sizes, reverse, name, Bs)
                c_n.append(c)
            elif op == "gru":
                out, h, _ = apply_rule(rules.GRULayer, x, h0[k], W_ih, W_hh, b_ih, b_hh, sizes, reverse, name, Bs)
            else:
                out, h = apply_rule(rules.RNNLayer, x, h0[k], W_ih, W_hh, b_ih, b_hh, op == "rnn_relu", sizes,
                                    reverse, name, Bs)
            outputs.append(out)
            h_n.append(h)
        x = outputs[0] if D == 1 else torch.cat(outputs, 1)
        if dropout_p and train and layer < num_layers - 1:  # torch: at::dropout on the layer's whole output
            x = dropout(x, dropout_p, True)
    if batch_sizes is None:
        x = x.view(T, N, x.shape[1])
        x = x.transpose(0, 1) if batch_first else x
    return (x, torch.stack(h_n), torch.stack(c_n)) if lstm else (x, torch.stack(h_n))


def _recurrent_overloads(op: str):
    def call(*args, **kwargs):
        # torch's two overloads: (input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
        # batch_first) and, for a PackedSequence, (data, batch_sizes, hx, params, has_biases, num_layers,
        # dropout, train, bidirectional); the fourth argument (has_biases or params) tells them apart.
        if isinstance(args[3], bool):
            return _recurrent(op, args[0], None, *args[1:], **kwargs)
        return _recurrent(op, *args, False, **kwargs)

    call.__name__ = call.__qualname__ = op
    call.__doc__ = (
        f"torch.{op} on our rules: (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, "
        "batch_first), or (data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, "
        "bidirectional) for a PackedSequence's data. params: per layer and direction W_ih, W_hh[, b_ih, b_hh]"
        + ("[, W_hr]; hx = (h0, c0). Returns (output, h_n, c_n)." if op == "lstm" else "; hx = h0. Returns (output, h_n).")
    )
    return call


lstm = _recurrent_overloads("lstm")
gru = _recurrent_overloads("gru")
rnn_tanh = _recurrent_overloads("rnn_tanh")
rnn_relu = _recurrent_overloads("rnn_relu")


def _cell_checks(op: str, input: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor) -> None:
    if input.dim() != 2 or h.dim() != 2 or h.shape[0] != input.shape[0] or input.shape[1] != w_ih.shape[1]:
        raise InputError(f"{op}: input must be (N, input_size={w_ih.shape[1]}) and hx (N, hidden_size), "
                         f"got input {shape(input)} and hx {shape(h)}")


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, feedback=None):
    """One LSTM step (`rules.LSTMLayer` with T = 1). input: (N, in); hx = (h, c), each (N, H). Returns (h', c').
    feedback: None (backprop) or a learning rule's (B_ih, B_hh)."""
    _cell_checks("lstm_cell", input, hx[0], w_ih)
    _, h, c, _, _ = apply_rule(rules.LSTMLayer, input, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh, None,
                               (input.shape[0],), False, "", feedback)
    return h, c


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, feedback=None):
    """One GRU step (`rules.GRULayer` with T = 1). input: (N, in); hx: (N, H). Returns h'.
    feedback: None (backprop) or a learning rule's (B_ih, B_hh)."""
    _cell_checks("gru_cell", input, hx, w_ih)
    return apply_rule(rules.GRULayer, input, hx, w_ih, w_hh, b_ih, b_hh, (input.shape[0],), False, "", feedback)[1]


def _rnn_cell(op: str, relu: bool):
    def cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, feedback=None):
        _cell_checks(op, input, hx, w_ih)
        return apply_rule(rules.RNNLayer, input, hx, w_ih, w_hh, b_ih, b_hh, relu, (input.shape[0],), False, "",
                          feedback)[1]

    cell.__name__ = cell.__qualname__ = op
    cell.__doc__ = f"One RNN step, h' = {'relu' if relu else 'tanh'}(x W_ihᵀ + b_ih + h W_hhᵀ + b_hh) (`rules.RNNLayer`, T = 1)."
    return cell


rnn_tanh_cell = _rnn_cell("rnn_tanh_cell", relu=False)
rnn_relu_cell = _rnn_cell("rnn_relu_cell", relu=True)
