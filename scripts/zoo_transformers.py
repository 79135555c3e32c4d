"""Faithful copies of transformer architectures users convert, at tiny sizes, for coverage tests and reports.

The libraries (transformers, torchvision, timm) cannot be installed beside this project's CPU
torch, so their classes are copied here with the same structure, module names, parameter
names and forward computations:

    bert_classifier      transformers' BertForSequenceClassification (SDPA attention, GELUActivation)
    gpt2_lm              transformers' GPT2LMHeadModel (Conv1D, NewGELUActivation, lm_head tied to wte)
    torchvision_vit      torchvision.models.VisionTransformer (class token, pos embedding, MultiheadAttention)
    timm_vit             timm's VisionTransformer (qkv Linear + F.scaled_dot_product_attention, LayerScale / Identity)
    torch_transformer    torch.nn.Transformer itself

The GPT-2 and BERT copies take Conv1D and the activation modules from `transformers`, so the
caller must make `transformers` importable (tests use tests/stand_ins). Each builder returns
(model, inputs, target, loss_fn).

    python scripts/zoo_transformers.py     # prints each model's convert report summary
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------ BERT (transformers)


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size, hidden_size, max_position_embeddings, type_vocab_size, dropout):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(max_position_embeddings).expand((1, -1)), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(self.position_ids.size(), dtype=torch.long), persistent=False)

    def forward(self, input_ids):
        seq_length = input_ids.shape[1]
        position_ids = self.position_ids[:, :seq_length]
        token_type_ids = self.token_type_ids[:, :seq_length].expand(input_ids.shape[0], seq_length)
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BertSdpaSelfAttention(nn.Module):
    def __init__(self, hidden_size, num_heads, dropout):
        super().__init__()
        self.num_attention_heads = num_heads
        self.attention_head_size = hidden_size // num_heads
        self.all_head_size = hidden_size
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout_prob = dropout

    def transpose_for_scores(self, x):
        return x.view(x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)).permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask):
        query = self.transpose_for_scores(self.query(hidden_states))
        key = self.transpose_for_scores(self.key(hidden_states))
        value = self.transpose_for_scores(self.value(hidden_states))
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=self.dropout_prob if self.training else 0.0
        )
        context = context.transpose(1, 2).reshape(hidden_states.shape[0], -1, self.all_head_size)
        return context


class BertSelfOutput(nn.Module):
    def __init__(self, hidden_size, dropout):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, hidden_size, num_heads, dropout):
        super().__init__()
        self.self = BertSdpaSelfAttention(hidden_size, num_heads, dropout)
        self.output = BertSelfOutput(hidden_size, dropout)

    def forward(self, hidden_states, attention_mask):
        return self.output(self.self(hidden_states, attention_mask), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        from transformers.activations import ACT2FN

        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.intermediate_act_fn = ACT2FN["gelu"]

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, hidden_size, intermediate_size, dropout):
        super().__init__()
        self.dense = nn.Linear(intermediate_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    def __init__(self, hidden_size, num_heads, intermediate_size, dropout):
        super().__init__()
        self.attention = BertAttention(hidden_size, num_heads, dropout)
        self.intermediate = BertIntermediate(hidden_size, intermediate_size)
        self.output = BertOutput(hidden_size, intermediate_size, dropout)

    def forward(self, hidden_states, attention_mask):
        attention_output = self.attention(hidden_states, attention_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, num_layers, *args):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(*args) for _ in range(num_layers)])

    def forward(self, hidden_states, attention_mask):
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask)
        return hidden_states


class BertPooler(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


class BertModel(nn.Module):
    def __init__(self, vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions, dropout):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_positions, 2, dropout)
        self.encoder = BertEncoder(num_layers, hidden_size, num_heads, intermediate_size, dropout)
        self.pooler = BertPooler(hidden_size)

    def forward(self, input_ids, attention_mask):
        # the 4-D additive mask of _prepare_4d_attention_mask_for_sdpa: 0 where attended, min where padding
        dtype = self.embeddings.word_embeddings.weight.dtype
        extended = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        return self.pooler(self.encoder(self.embeddings(input_ids), extended))


class BertForSequenceClassification(nn.Module):
    def __init__(self, num_labels=3, vocab_size=400, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                 max_positions=16, dropout=0.1):
        super().__init__()
        self.bert = BertModel(vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions, dropout)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        return self.classifier(self.dropout(self.bert(input_ids, attention_mask)))


def bert_classifier(dtype=torch.float64, batch=3, seq=7):
    torch.manual_seed(0)
    model = BertForSequenceClassification().to(dtype)
    input_ids = torch.randint(1, 400, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[0, -2:] = 0  # padding
    input_ids[0, -2:] = 0
    return model, (input_ids, attention_mask), torch.randint(0, 3, (batch,)), nn.CrossEntropyLoss()


# ------------------------------------------------------------------ GPT-2 (transformers)


class GPT2Attention(nn.Module):
    def __init__(self, hidden_size, num_heads, dropout):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        self.split_size = hidden_size
        self.c_attn = Conv1D(3 * hidden_size, hidden_size)
        self.c_proj = Conv1D(hidden_size, hidden_size)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, hidden_states):
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query, key, value = (t.view(shape).transpose(1, 2) for t in (query, key, value))
        attn_output = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.attn_dropout.p if self.training else 0.0, is_causal=True
        )
        attn_output = attn_output.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.resid_dropout(self.c_proj(attn_output))


class GPT2MLP(nn.Module):
    def __init__(self, intermediate_size, hidden_size, dropout):
        from transformers.activations import ACT2FN
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.c_fc = Conv1D(intermediate_size, hidden_size)
        self.c_proj = Conv1D(hidden_size, intermediate_size)
        self.act = ACT2FN["gelu_new"]
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states):
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class GPT2Block(nn.Module):
    def __init__(self, hidden_size, num_heads, dropout):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_size, eps=1e-5)
        self.attn = GPT2Attention(hidden_size, num_heads, dropout)
        self.ln_2 = nn.LayerNorm(hidden_size, eps=1e-5)
        self.mlp = GPT2MLP(4 * hidden_size, hidden_size, dropout)

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2Model(nn.Module):
    def __init__(self, vocab_size, n_positions, hidden_size, num_layers, num_heads, dropout):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, hidden_size)
        self.wpe = nn.Embedding(n_positions, hidden_size)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList([GPT2Block(hidden_size, num_heads, dropout) for _ in range(num_layers)])
        self.ln_f = nn.LayerNorm(hidden_size, eps=1e-5)

    def forward(self, input_ids):
        position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device).unsqueeze(0)
        hidden_states = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        for block in self.h:
            hidden_states = block(hidden_states)
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, vocab_size=300, n_positions=16, hidden_size=16, num_layers=2, num_heads=2, dropout=0.1):
        super().__init__()
        self.transformer = GPT2Model(vocab_size, n_positions, hidden_size, num_layers, num_heads, dropout)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2's tie_word_embeddings

    def forward(self, input_ids):
        return self.lm_head(self.transformer(input_ids))


def _next_token_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def gpt2_lm(dtype=torch.float64, batch=2, seq=6):
    torch.manual_seed(0)
    model = GPT2LMHeadModel().to(dtype)
    input_ids = torch.randint(0, 300, (batch, seq))
    return model, (input_ids,), input_ids, _next_token_loss


# ------------------------------------------------------------------ torchvision ViT


class MLPBlock(nn.Sequential):
    """torchvision.models.vision_transformer.MLPBlock (a torchvision.ops.MLP): Linear, GELU, Dropout, Linear, Dropout."""

    def __init__(self, in_dim, mlp_dim, dropout):
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, in_dim),
                         nn.Dropout(dropout))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    def __init__(self, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input):
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    def __init__(self, seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        layers = OrderedDict()
        for i in range(num_layers):
            layers[f"encoder_layer_{i}"] = EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout)
        self.layers = nn.Sequential(layers)
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, input):
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class VisionTransformer(nn.Module):
    """torchvision.models.VisionTransformer."""

    def __init__(self, image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, dropout=0.1,
                 attention_dropout=0.1, num_classes=10):
        super().__init__()
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout)
        self.seq_length = seq_length
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))

    def _process_input(self, x):
        n, c, h, w = x.shape
        n_h, n_w = h // self.patch_size, w // self.patch_size
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, n_h * n_w)
        return x.permute(0, 2, 1)

    def forward(self, x):
        x = self._process_input(x)
        batch_class_token = self.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        return self.heads(x[:, 0])


def torchvision_vit(dtype=torch.float64, batch=2):
    torch.manual_seed(0)
    model = VisionTransformer().to(dtype)
    return model, (torch.randn(batch, 3, 16, 16, dtype=dtype),), torch.randint(0, 10, (batch,)), nn.CrossEntropyLoss()


# ------------------------------------------------------------------ timm ViT


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)  # NCHW -> NLC
        return self.norm(x)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, init_values=None, proj_drop=0.0, attn_drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class TimmVisionTransformer(nn.Module):
    """timm.models.vision_transformer.VisionTransformer (class token, learned pos embed, pre-norm blocks)."""

    def __init__(self, img_size=16, patch_size=4, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                 init_values=None, drop_rate=0.1, attn_drop_rate=0.1):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        self.patch_drop = nn.Identity()
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, init_values, proj_drop=drop_rate, attn_drop=attn_drop_rate)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.norm_pre(self.patch_drop(x))
        x = self.norm(self.blocks(x))
        return self.head(self.head_drop(self.fc_norm(x[:, 0])))


def timm_vit(dtype=torch.float64, batch=2, init_values=None):
    torch.manual_seed(0)
    model = TimmVisionTransformer(init_values=init_values).to(dtype)
    return model, (torch.randn(batch, 3, 16, 16, dtype=dtype),), torch.randint(0, 10, (batch,)), nn.CrossEntropyLoss()


# ------------------------------------------------------------------ torch.nn.Transformer


class Seq2Seq(nn.Module):
    """torch.nn.Transformer between a source and a target sequence of vectors, with a causal target mask."""

    def __init__(self, d_model=16, nhead=2):
        super().__init__()
        self.transformer = nn.Transformer(d_model, nhead, num_encoder_layers=2, num_decoder_layers=2,
                                          dim_feedforward=32, dropout=0.1, batch_first=True)

    def forward(self, src, tgt):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=tgt.dtype)
        return self.transformer(src, tgt, tgt_mask=mask, tgt_is_causal=True)


def torch_transformer(dtype=torch.float64, batch=2):
    torch.manual_seed(0)
    model = Seq2Seq().to(dtype)
    src, tgt = torch.randn(batch, 5, 16, dtype=dtype), torch.randn(batch, 4, 16, dtype=dtype)
    return model, (src, tgt), torch.randn(batch, 4, 16, dtype=dtype), nn.MSELoss()


# name -> builder
MODELS = {
    "bert_classifier": bert_classifier,
    "gpt2_lm": gpt2_lm,
    "torchvision_vit": torchvision_vit,
    "timm_vit": timm_vit,
    "timm_vit_layerscale": partial(timm_vit, init_values=1e-5),
    "torch_transformer": torch_transformer,
}


def manual_share(report) -> float:
    total = report.manual_parameters + report.stock_parameters
    return report.manual_parameters / total if total else math.nan


if __name__ == "__main__":  # a coverage table, with the Hugging Face plugin (needs transformers importable)
    import manual_backprop as mb
    from manual_backprop.plugins import huggingface

    registry = mb.Registry(builtins=True)
    huggingface.register(registry)
    for name, build in MODELS.items():
        model = build()[0]
        report = mb.report(mb.convert(model, registry=registry), registry=registry)
        print(f"{name:22s} {100 * manual_share(report):5.1f}% of parameter elements on manual rules")
        for row in report.stock_parameter_rows:
            print(f"    stock: {row.name} ({row.numel}): {row.reason}")
