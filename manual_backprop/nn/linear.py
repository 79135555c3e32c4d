"""Linear layers on our rules. Same constructor, parameters, state_dict and repr as torch."""

from __future__ import annotations

import torch

from manual_backprop import functional as F


class Linear(torch.nn.Linear):
    """torch.nn.Linear whose backward is the notes' algebra.  Input: (*, H_in); output: (*, H_out)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)


class Identity(torch.nn.Identity):
    """torch.nn.Identity: z = a, δ passes unchanged. Nothing to compute, so no graph node either.

    Returns its input itself, as torch's does (`F.identity` / `rules.Identity` remain for
    the fused MLP, where "identity" is a layer's activation).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input
