"""The real models users convert, from the installed packages: Hugging Face transformers' GPT-2, BERT,
Llama, T5, ViT and DistilBERT, and Lightning's demo models (pytorch_lightning.demos).

Each is a tiny randomly initialised config (scripts/zoo_transformers.py; nothing is downloaded), in
float64 and train mode with dropout on. For each: the share of parameters on our rules (every
parameter left stock named with its reason), the loss and every gradient equal to stock through
`convert` and through `manual_functions()`, and one per-sample gradient + δ tape pass.
"""

from __future__ import annotations

import fnmatch
import warnings

import pytest
import torch
import transformers

import manual_backprop as mb
from manual_backprop.plugins import huggingface as hf
from manual_backprop.registry import PluginWarning, Registry
from manual_backprop.testing import assert_grad_parity, rule_nodes
from tests.cases import FLOAT64
from tests.scripts import load_script

zoo = load_script("zoo_transformers")
REAL = zoo.HUGGING_FACE + zoo.LIGHTNING

# float64 parity: the rules compute what stock computes, to a few units in the last place.
EXACT = dict(rtol=1e-12, atol=1e-14)

# Parameters each model leaves on stock autograd under convert, with the report's reason: none.
LEFT_STOCK: dict[str, dict[str, str]] = {name: {} for name in REAL}

# Rules beyond Linear, Embedding, LayerNorm and Dropout that each model needs: their backward nodes
# must be in the converted model's graph.
RULES = {
    "gpt2_lm": {"Conv1DBackward", "GELUBackward"},
    "bert_classifier": {"GELUBackward", "TanhBackward"},
    "llama_lm": {"LlamaRMSNormBackward", "SiLUBackward"},
    "t5_seq2seq": {"T5LayerNormBackward", "ReLUBackward"},
    "vit_classifier": {"ClassTokenAndPositionsBackward", "ConvolutionBackward", "GELUBackward"},
    "distilbert_classifier": {"GELUBackward"},  # its classifier's nn.ReLU() is made inside forward: stock
    "lightning_boring": {"LinearBackward"},
    "lightning_transformer": {"AttentionBackward", "ReLUBackward"},
}

# Attention calls per forward that manual_functions() routes to our scaled_dot_product_attention
# (transformers' "sdpa" interface), or to our multi_head_attention_forward (nn.Transformer).
ATTENTION = {
    "gpt2_lm": ("scaled_dot_product_attention", 2),
    "bert_classifier": ("scaled_dot_product_attention", 2),
    "llama_lm": ("scaled_dot_product_attention", 2),
    "t5_seq2seq": ("scaled_dot_product_attention", 6),  # encoder self, decoder self and cross, 2 layers
    "vit_classifier": ("scaled_dot_product_attention", 2),
    "distilbert_classifier": ("scaled_dot_product_attention", 2),
    "lightning_transformer": ("multi_head_attention_forward", 6),
}

# A layer on our rules used once per forward whose weight gradient the δ tape must reproduce
# (Σ δ aᵀ; Conv1D stores W as in × out: Σ a δᵀ).
TAPE_LAYER = {
    "gpt2_lm": "transformer.h.0.mlp.c_fc",
    "bert_classifier": "classifier",
    "llama_lm": "lm_head",
    "t5_seq2seq": "decoder.block.0.layer.2.DenseReluDense.wo",
    "vit_classifier": "classifier",
    "distilbert_classifier": "classifier",
    "lightning_boring": "layer",
    "lightning_transformer": "decoder",
}

# Parameters shared by every sample: position embeddings looked up by positions (1, T) and T5's relative
# position bias (an Embedding of bucket indices) are broadcast over the batch, so δ reaches their rule
# already summed over the samples. Kept stock for per-sample gradients (per_sample_grads refuses them
# on our rules: see the last test).
NO_PER_SAMPLE = {
    "gpt2_lm": ["transformer.wpe"],
    "bert_classifier": ["bert.embeddings.position_embeddings"],
    "t5_seq2seq": ["*relative_attention_bias"],
    "distilbert_classifier": ["distilbert.embeddings.position_embeddings"],
}


def test_the_real_plugin_loads_whole_and_converts_gpt2s_conv1d():
    """In the installed transformers, PytorchGELUTanh is GELUTanh: the plugin registers that class twice,
    and the registry must keep the plugin (not roll it back) so that every Conv1D converts."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        registry = Registry(builtins=True, plugins=True)
        model = zoo.gpt2_lm()[0]
        converted = mb.convert(model, registry=registry, strict=True)
    assert not registry.plugin_failures
    conv1ds = [m for m in converted.modules() if isinstance(m, transformers.pytorch_utils.Conv1D)]
    assert len(conv1ds) == 8 and all(type(m).__module__ == hf.__name__ for m in conv1ds)
    assert zoo.manual_share(mb.report(converted, registry=registry)) == 1.0


@pytest.mark.parametrize("name", REAL)
def test_at_least_99_percent_of_parameters_on_our_rules(name):
    report = mb.report(mb.convert(zoo.MODELS[name]()[0]))
    assert not report.plugin_failures
    assert {row.name: row.reason for row in report.stock_parameter_rows} == LEFT_STOCK[name], str(report)
    assert zoo.manual_share(report) >= 0.99


def _dropout_is_on(model, inputs) -> bool:
    """Two train-mode forwards with different seeds differ: dropout draws masks."""
    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model(*inputs)
        outputs.append(out.logits if hasattr(out, "logits") else out)
    return not torch.equal(*outputs)


@pytest.mark.parametrize("via", ["convert", "manual_functions"])
@pytest.mark.parametrize("name", REAL)
def test_float64_gradients_equal_stock_in_train_mode(name, via):
    model, inputs, target, loss_fn = zoo.MODELS[name]()
    model.train()
    assert name == "lightning_boring" or _dropout_is_on(model, inputs)
    result = assert_grad_parity(model, inputs, target, loss_fn, via=via, **EXACT)
    assert len(result.rows) > len(list(model.parameters()))  # loss, outputs, every gradient
    if via == "convert":
        assert RULES[name] <= set(result.rule_nodes), result.rule_nodes
        assert not [row for row in result.conversion.stock_parameter_rows]
    elif name in ATTENTION:
        call, count = ATTENTION[name]
        assert result.routed[call] == count, result.routed


def _layer_weight_grad(module, delta, a) -> torch.Tensor:
    """Σ over every sample and position of δ aᵀ (torch's out × in layout), or a δᵀ for Conv1D (in × out)."""
    product = delta.reshape(-1, delta.shape[-1]).T @ a.reshape(-1, a.shape[-1])
    return product.T if isinstance(module, transformers.pytorch_utils.Conv1D) else product


@pytest.mark.parametrize("name", REAL)
def test_per_sample_gradients_and_the_tape(name):
    """Per-sample gradients average to the batch gradient (each loss is a mean over equal samples), their
    norms are the norms of those gradients, and the tape's δ and a give a layer's weight gradient."""
    model, inputs, target, loss_fn = zoo.MODELS[name]()
    exclude = NO_PER_SAMPLE.get(name, [])
    converted = mb.convert(model, exclude=exclude).train()
    with mb.per_sample_grads(converted, strict=not exclude) as ps, mb.tape(converted) as tape:
        loss_fn(converted(*inputs), target).backward()
    names = dict(converted.named_parameters())
    skipped = {n for n, p in names.items() if p.grad_sample is None}
    assert skipped == {n for n in names if any(fnmatch.fnmatchcase(n.rsplit(".", 1)[0], e) for e in exclude)}
    assert len(ps.skipped) == len(skipped)
    batch = inputs[0].shape[0]
    square = torch.zeros(batch, dtype=torch.float64)
    for n, p in names.items():
        if n in skipped:
            continue
        assert p.grad_sample.shape == (batch, *p.shape)
        torch.testing.assert_close(p.grad_sample.mean(0), p.grad, **FLOAT64, msg=n)
        square += p.grad_sample.flatten(1).square().sum(1)
    torch.testing.assert_close(ps.norms, square.sqrt(), **FLOAT64)
    layer = converted.get_submodule(TAPE_LAYER[name])
    expected = _layer_weight_grad(layer, tape.delta[TAPE_LAYER[name]], tape.input[TAPE_LAYER[name]])
    torch.testing.assert_close(expected, layer.weight.grad, **FLOAT64)


@pytest.mark.parametrize("name,module", [("t5_seq2seq", "relative_attention_bias"), ("gpt2_lm", "transformer.wpe"),
                                         ("distilbert_classifier", "position_embeddings")])
def test_per_sample_gradients_refuse_a_parameter_shared_by_every_sample(name, module):
    model, inputs, target, loss_fn = zoo.MODELS[name]()
    converted = mb.convert(model).train()
    with pytest.raises(mb.InputError, match=rf"{module} \(Embedding\).*shared by every sample"):
        with mb.per_sample_grads(converted):
            loss_fn(converted(*inputs), target).backward()


def test_coverage_table_names_the_versions_and_each_models_share():
    table = zoo.coverage_table(["llama_lm", "torchvision_vit"])
    assert f"transformers {transformers.__version__}" in table
    assert "| llama_lm | 6,288 | 100.0% |" in table and "| none |" in table
    assert "| torchvision_vit (copy) |" in table and "`class_token` (32): used directly by VisionTransformer's" in table


def test_lightning_transformers_training_step_on_our_rules_equals_stock():
    """Through the door Lightning users come in by: LightningTransformer.training_step, converted whole."""
    from pytorch_lightning.demos import LightningTransformer

    torch.manual_seed(0)
    stock = LightningTransformer(vocab_size=zoo.VOCAB).double().train()
    ours = mb.convert(stock)
    batch = (zoo._tokens(torch.Generator().manual_seed(1)), zoo._tokens(torch.Generator().manual_seed(2)))
    losses = []
    for module in (ours, stock):
        torch.manual_seed(3)  # the same dropout masks
        loss = module.training_step(batch, 0)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], **FLOAT64)
    assert {"AttentionBackward", "LinearBackward", "LayerNormBackward"} <= set(rule_nodes(losses[0]))
    for (name, p), q in zip(ours.named_parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **FLOAT64, msg=name)
