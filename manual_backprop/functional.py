"""`torch.nn.functional`, with every gradient from our rules.

Same names, signatures and defaults as torch.nn.functional. Each function checks
its inputs (metadata only on the hot path; see `_checks`), casts them as autocast
would cast the stock op's (see `_amp`), and calls its rule in `manual_backprop.rules`.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn import _reduction

from manual_backprop import _checks, rules
from manual_backprop._amp import autocast_inputs
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
]


# ---------------------------------------------------------------- linear


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """z = a Wᵀ + b.  Input: (*, in_features); weight: (out, in); bias: (out,). Output: (*, out)."""
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
    input, weight, bias = autocast_inputs("linear", input.device, input, weight, bias)
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        _checks.same_dtype("linear", input=input, weight=weight, bias=bias)
    return apply_rule(rules.Linear, input, weight, bias)


# ----------------------------------------------------------- activations


def _activate(op: str, rule, input: torch.Tensor, inplace: bool, *params) -> torch.Tensor:
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
