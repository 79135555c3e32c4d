"""Embedding on our rule. Same constructor, parameters, state_dict and repr as torch."""

from __future__ import annotations

import torch

from manual_backprop import functional as F


class Embedding(torch.nn.Embedding):
    """torch.nn.Embedding: z = E[x], ∂J/∂E[i] = Σ of δ over the positions that looked up row i.

    Input: (*) integer indices; output: (*, embedding_dim). `sparse=True` is refused (convert
    leaves such a module on stock autograd and says so).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
