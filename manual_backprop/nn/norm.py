"""Normalisation modules on our rules. Each subclasses its torch.nn counterpart and overrides forward only."""

from __future__ import annotations

import torch

from manual_backprop import functional as F


class _BatchNormForward:
    """torch's `_BatchNorm.forward`, its bookkeeping line for line, calling our `batch_norm`.

    num_batches_tracked counts training steps; momentum=None makes the running statistics a
    cumulative average (factor 1/num_batches_tracked); eval mode uses the running statistics
    unless the module keeps none (track_running_stats=False), then the batch's.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:  # exponential moving average
                exponential_average_factor = self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats  # buffers are passed only when used or updated
        return F.batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )


class BatchNorm1d(torch.nn.BatchNorm1d):
    """Input: (N, C) or (N, C, L). Output: like input."""

    forward = _BatchNormForward.forward


class BatchNorm2d(torch.nn.BatchNorm2d):
    """Input: (N, C, H, W). Output: like input."""

    forward = _BatchNormForward.forward


class BatchNorm3d(torch.nn.BatchNorm3d):
    """Input: (N, C, D, H, W). Output: like input."""

    forward = _BatchNormForward.forward


class LayerNorm(torch.nn.LayerNorm):
    """Input: (*, *normalized_shape). Output: like input."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """Input: (*, *normalized_shape). Output: like input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class GroupNorm(torch.nn.GroupNorm):
    """Input: (N, C, *). Output: like input."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
