"""Attention modules on our rules: MultiheadAttention and the Transformer layers built on it.

Each subclasses its torch.nn counterpart and overrides `forward` only. torch's own
forwards may take a fused "fast path" (`torch._native_multi_head_attention`, nested
tensors) when no gradient is wanted; ours never do: they always run the rules, so
training and inference compute the same thing, the same way. Only nested-tensor inputs,
which only that inference path produces, are handed back to torch's forward.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as TF

from manual_backprop import functional as F


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention: in-projections and out-projection on our Linear rule, the
    attention itself on ours (S = QKᵀ/√d + mask, P = softmax(S), O = PV).

    Every constructor option and forward argument of torch's. Query: (L, N, E) or (N, L, E) with
    batch_first, or unbatched (L, E); output likewise, and the (averaged) weights when need_weights.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:  # only torch's inference fast path takes these
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        key_padding_mask = TF._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=TF._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=query.dtype,
        )
        attn_mask = TF._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype,
            check_other=False,
        )
        batch_first = self.batch_first and query.dim() == 3
        if batch_first:  # to (L, N, E), keeping `query is key is value` where it holds
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        attn_output, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=separate,
            q_proj_weight=self.q_proj_weight if separate else None,
            k_proj_weight=self.k_proj_weight if separate else None,
            v_proj_weight=self.v_proj_weight if separate else None,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        return (attn_output.transpose(1, 0) if batch_first else attn_output), weights


def manual_activation(activation: Callable) -> Callable:
    """A Transformer layer's activation on our rules: a module as it is (convert converts it), a
    torch function (F.relu, F.gelu, ...) replaced by ours; None if we have no rule for it."""
    if isinstance(activation, torch.nn.Module):
        return activation
    from manual_backprop.mode import ROUTES  # the one table of torch function -> ours

    route = ROUTES.get(activation)
    return None if route is None else route[1]


def _activation(layer: torch.nn.Module) -> Callable:
    return manual_activation(layer.activation) or layer.activation


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer, always on the training path: self-attention and
    feed-forward blocks from its (converted) children, a function activation on our rule."""

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if src.is_nested:  # only torch's inference fast path makes nested tensors
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        src_key_padding_mask = TF._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=TF._none_or_dtype(src_mask),
            other_name="src_mask", target_type=src.dtype,
        )
        src_mask = TF._canonical_mask(
            mask=src_mask, mask_name="src_mask", other_type=None, other_name="", target_type=src.dtype,
            check_other=False,
        )
        activation = _activation(self)

        def attend(x):
            x = self.self_attn(x, x, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                               need_weights=False, is_causal=is_causal)[0]
            return self.dropout1(x)

        def feed_forward(x):
            return self.dropout2(self.linear2(self.dropout(activation(self.linear1(x)))))

        x = src
        if self.norm_first:
            x = x + attend(self.norm1(x))
            return x + feed_forward(self.norm2(x))
        x = self.norm1(x + attend(x))
        return self.norm2(x + feed_forward(x))


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """torch.nn.TransformerDecoderLayer with a function activation on our rule; the rest from
    its (converted) children."""

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> torch.Tensor:
        activation = _activation(self)

        def attend(x):
            x = self.self_attn(x, x, x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                               is_causal=tgt_is_causal, need_weights=False)[0]
            return self.dropout1(x)

        def attend_memory(x):
            x = self.multihead_attn(x, memory, memory, attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask,
                                    is_causal=memory_is_causal, need_weights=False)[0]
            return self.dropout2(x)

        def feed_forward(x):
            return self.dropout3(self.linear2(self.dropout(activation(self.linear1(x)))))

        x = tgt
        if self.norm_first:
            x = x + attend(self.norm1(x))
            x = x + attend_memory(self.norm2(x))
            return x + feed_forward(self.norm3(x))
        x = self.norm1(x + attend(x))
        x = self.norm2(x + attend_memory(x))
        return self.norm3(x + feed_forward(x))
