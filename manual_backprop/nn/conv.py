"""Convolution modules on our rules. Same constructor, parameters, state_dict and repr as torch.

Each subclasses its torch.nn counterpart and overrides forward only. Padding modes other
than "zeros" pad with `F.pad` (our Pad rule) and convolve with padding 0, as torch does.
"""

from __future__ import annotations

import torch

from manual_backprop import functional as F


def _conv_forward(module: torch.nn.modules.conv._ConvNd, input: torch.Tensor, conv) -> torch.Tensor:
    if module.padding_mode != "zeros":
        padded = F.pad(input, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return conv(padded, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
    return conv(input, module.weight, module.bias, module.stride, module.padding, module.dilation, module.groups)


class Conv1d(torch.nn.Conv1d):
    """torch.nn.Conv1d whose backward is the notes' algebra.  Input: (N, C_in, L) or (C_in, L)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _conv_forward(self, input, F.conv1d)


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d whose backward is the notes' algebra.  Input: (N, C_in, H, W) or (C_in, H, W)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _conv_forward(self, input, F.conv2d)


class Conv3d(torch.nn.Conv3d):
    """torch.nn.Conv3d whose backward is the notes' algebra.  Input: (N, C_in, D, H, W) or (C_in, D, H, W)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _conv_forward(self, input, F.conv3d)


def _conv_transpose_forward(module, input, output_size, conv_transpose, d: int) -> torch.Tensor:
    if module.padding_mode != "zeros":
        raise ValueError(f"Only 'zeros' padding mode is supported for {type(module).__name__}")
    output_padding = module._output_padding(
        input, output_size, module.stride, module.padding, module.kernel_size, d, module.dilation
    )
    return conv_transpose(input, module.weight, module.bias, module.stride, module.padding, output_padding,
                          module.groups, module.dilation)


class ConvTranspose1d(torch.nn.ConvTranspose1d):
    """torch.nn.ConvTranspose1d on our rule.  forward(input, output_size=None) as torch's."""

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return _conv_transpose_forward(self, input, output_size, F.conv_transpose1d, 1)


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    """torch.nn.ConvTranspose2d on our rule.  forward(input, output_size=None) as torch's."""

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return _conv_transpose_forward(self, input, output_size, F.conv_transpose2d, 2)


class ConvTranspose3d(torch.nn.ConvTranspose3d):
    """torch.nn.ConvTranspose3d on our rule.  forward(input, output_size=None) as torch's."""

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return _conv_transpose_forward(self, input, output_size, F.conv_transpose3d, 3)
