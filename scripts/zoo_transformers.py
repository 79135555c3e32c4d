"""Transformer models users convert, at tiny sizes, for coverage tests and the README's coverage table.

The real classes wherever the package installs here:

    gpt2_lm                 transformers' GPT2LMHeadModel (Conv1D, NewGELUActivation, lm_head tied to wte)
    bert_classifier         transformers' BertForSequenceClassification (padding mask, GELUActivation)
    llama_lm                transformers' LlamaForCausalLM (LlamaRMSNorm, rotary embeddings,
                            grouped-query attention, SiLU-gated MLP)
    t5_seq2seq              transformers' T5ForConditionalGeneration (T5LayerNorm, relative position bias)
    vit_classifier          transformers' ViTForImageClassification (class token, position embeddings)
    distilbert_classifier   transformers' DistilBertForSequenceClassification (padding mask)
    lightning_boring        pytorch_lightning.demos' BoringModel (its own loss)
    lightning_transformer   pytorch_lightning.demos' Transformer (nn.Transformer, log_softmax + nll_loss)
    torch_transformer       torch.nn.Transformer itself

Each is a randomly initialised config (nothing is downloaded), with dropout on, attention
through transformers' "sdpa" interface. Copies, only where the real package cannot be
installed beside this CPU torch (torchvision's wheels are CUDA builds, and timm needs
torchvision): same structure, module names, parameter names and forward computations as

    torchvision_vit         torchvision.models.VisionTransformer (class token, pos embedding, MultiheadAttention)
    timm_vit                timm's VisionTransformer (qkv Linear + F.scaled_dot_product_attention, LayerScale / Identity)

Each builder returns (model, inputs, target, loss_fn), model in float64 unless `dtype` says otherwise.

    python scripts/zoo_transformers.py     # prints the coverage table (Markdown), with the versions used
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, BATCH = 50, 5, 3


def _tokens(generator, shape=(BATCH, SEQ)):
    return torch.randint(0, VOCAB, shape, generator=generator)


def _padding_mask():
    """1 where attended; the first sequence ends in two padding tokens."""
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, -2:] = 0
    return mask


def _token_loss(output, labels):
    """Cross-entropy of every position's logits (a ModelOutput's) against `labels`."""
    return F.cross_entropy(output.logits.flatten(0, -2), labels.flatten())


def _class_loss(output, labels):
    return F.cross_entropy(output.logits, labels)


# ------------------------------------------------------------------ Hugging Face transformers


def gpt2_lm(dtype=torch.float64):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)  # dropouts: 0.1 by default
    model = transformers.GPT2LMHeadModel(config).to(dtype)
    ids = _tokens(torch.Generator().manual_seed(1))
    return model, (ids,), ids, _token_loss


def bert_classifier(dtype=torch.float64):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config).to(dtype)
    ids = _tokens(torch.Generator().manual_seed(1))
    return model, (ids, _padding_mask()), torch.tensor([0, 1, 2]), _class_loss


def llama_lm(dtype=torch.float64):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      attention_dropout=0.1, bos_token_id=0, eos_token_id=0, use_cache=False)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    ids = _tokens(torch.Generator().manual_seed(1))
    return model, (ids,), ids, _token_loss


def t5_seq2seq(dtype=torch.float64):
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                   use_cache=False)
    model = transformers.T5ForConditionalGeneration(config).to(dtype)
    generator = torch.Generator().manual_seed(1)
    ids, decoder_ids = _tokens(generator), _tokens(generator, (BATCH, 4))
    # forward(input_ids, attention_mask, decoder_input_ids)
    return model, (ids, _padding_mask(), decoder_ids), decoder_ids, _token_loss


def vit_classifier(dtype=torch.float64):
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3,
                                    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = transformers.ViTForImageClassification(config).to(dtype)
    pixels = torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return model, (pixels,), torch.tensor([0, 1, 2]), _class_loss


def distilbert_classifier(dtype=torch.float64):
    import transformers

    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                           max_position_embeddings=16, num_labels=3)  # dropouts 0.1, 0.2
    model = transformers.DistilBertForSequenceClassification(config).to(dtype)
    ids = _tokens(torch.Generator().manual_seed(1))
    return model, (ids, _padding_mask()), torch.tensor([0, 1, 2]), _class_loss


# ------------------------------------------------------------------ Lightning's demo models


def lightning_boring(dtype=torch.float64):
    from pytorch_lightning.demos.boring_classes import BoringModel

    torch.manual_seed(0)
    model = BoringModel().to(dtype)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 32, generator=generator, dtype=dtype), torch.randn(4, 2, generator=generator, dtype=dtype)
    return model, (x,), y, model.loss  # its own loss (mse_loss)


def lightning_transformer(dtype=torch.float64):
    from pytorch_lightning.demos import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=VOCAB, ninp=16, nhead=2, nhid=32, nlayers=2, dropout=0.2).to(dtype)
    generator = torch.Generator().manual_seed(1)
    source, target = _tokens(generator), _tokens(generator)
    # LightningTransformer.training_step's loss: nll_loss of the (N·T, vocab) log-probabilities
    return model, (source, target), target.reshape(-1), F.nll_loss


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


# name -> builder. The real packages' models first; then torch's own, then the copies.
MODELS = {
    "gpt2_lm": gpt2_lm,
    "bert_classifier": bert_classifier,
    "llama_lm": llama_lm,
    "t5_seq2seq": t5_seq2seq,
    "vit_classifier": vit_classifier,
    "distilbert_classifier": distilbert_classifier,
    "lightning_boring": lightning_boring,
    "lightning_transformer": lightning_transformer,
    "torch_transformer": torch_transformer,
    "torchvision_vit": torchvision_vit,
    "timm_vit": timm_vit,
    "timm_vit_layerscale": partial(timm_vit, init_values=1e-5),
}
HUGGING_FACE = ["gpt2_lm", "bert_classifier", "llama_lm", "t5_seq2seq", "vit_classifier", "distilbert_classifier"]
LIGHTNING = ["lightning_boring", "lightning_transformer"]
COPIES = ["torchvision_vit", "timm_vit", "timm_vit_layerscale"]


def manual_share(report) -> float:
    total = report.manual_parameters + report.stock_parameters
    return report.manual_parameters / total if total else math.nan


def gradients(model, inputs, target, loss_fn, via: str | None, seed: int = 0) -> dict:
    """{name: ∂J/∂p} of a deep copy of `model`: stock (via=None), converted, or under manual_functions()."""
    import contextlib
    import copy

    import manual_backprop as mb

    model = mb.convert(model) if via == "convert" else copy.deepcopy(model)
    mode = mb.manual_functions() if via == "manual_functions" else contextlib.nullcontext()
    with torch.random.fork_rng(), mode:
        torch.manual_seed(seed)
        loss = loss_fn(model(*inputs), target)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def worst_relative_difference(stock: dict, manual: dict, floor: float = 1e-10) -> tuple[float, list[str]]:
    """max over parameters of max|manual − stock| / max|stock|, and the parameters left out: those whose
    stock gradient is below `floor` × the model's largest (0 in exact arithmetic: an attention key's
    bias, which softmax cancels, holds rounding noise only, on both sides)."""
    largest = max(g.abs().max().item() for g in stock.values())
    worst, skipped = 0.0, []
    for name, g in stock.items():
        scale = g.abs().max().item()
        if scale <= floor * largest:
            skipped.append(name)
            continue
        worst = max(worst, (manual[name] - g).abs().max().item() / scale)
    return worst, skipped


def _short(reason: str) -> str:
    """The report's reason for a stock parameter, in a table cell's words."""
    owner = reason.split("' (", 1)[1].split(")", 1)[0].rsplit(".", 1)[-1]  # "owned by 'x' (pkg.Class): ..."
    if "custom forward uses its own parameters" in reason:
        return f"used directly by {owner}'s custom forward"
    return reason.split("): ", 1)[-1].replace("__main__.", "")


def coverage_table(names=None) -> str:
    """The README's table: each model's share of parameter elements on our rules, the worst float64
    relative gradient difference from stock (train mode, dropout on) through both doors, and every
    parameter left stock with the report's reason."""
    import importlib.metadata

    import manual_backprop as mb

    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("transformers", "pytorch-lightning", "torch"))
    lines = [f"Measured with {versions} (float64, train mode, dropout on; `python scripts/zoo_transformers.py`).",
             "",
             "| model | parameters | on our rules | worst grad difference: convert | manual_functions() | left stock |",
             "|---|---:|---:|---:|---:|---|"]
    for name in names or MODELS:
        model, inputs, target, loss_fn = MODELS[name]()
        model.train()
        report = mb.report(mb.convert(model))
        stock = gradients(model, inputs, target, loss_fn, None)
        cells = []
        for via in ("convert", "manual_functions"):
            worst, _ = worst_relative_difference(stock, gradients(model, inputs, target, loss_fn, via))
            cells.append(f"{worst:.1e}")
        left = "; ".join(f"`{row.name}` ({row.numel}): {_short(row.reason)}" for row in report.stock_parameter_rows)
        copy_note = " (copy)" if name in COPIES else ""
        total = report.manual_parameters + report.stock_parameters
        lines.append(f"| {name}{copy_note} | {total:,} | {100 * manual_share(report):.1f}% | {cells[0]} | {cells[1]} "
                     f"| {left or 'none'} |")
    lines += [
        "",
        "Worst grad difference: the largest max|ours − stock| / max|stock| over the parameters, the same dropout "
        "masks in both runs. Left out: gradients that are 0 in exact arithmetic (attention key biases, which "
        "softmax cancels), rounding noise on both sides.",
        "`manual_functions()` routes torch functions, not modules: GPT-2's Conv1D (`torch.addmm`), the RMS norms "
        "of Llama and T5 (`pow`, `mean`, `rsqrt`) and ViT's class token and positions (`cat`, `+`) run on stock "
        "in that door; `convert` puts them on the Hugging Face plugin's rules. Rotary position embeddings, "
        "T5's relative position bias (added to the scores) and grouped-query attention's head repeat are "
        "parameter-free arithmetic inside the attention's forward, on autograd in both doors.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(coverage_table())
