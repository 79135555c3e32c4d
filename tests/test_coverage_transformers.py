"""Transformer models users convert whose packages cannot be installed here: most parameters on our
rules, gradients equal to stock.

The models are faithful copies (scripts/zoo_transformers.py) of torchvision's and timm's ViT (torchvision's
wheels are CUDA builds; timm needs torchvision), and torch.nn.Transformer itself. The real transformers
and Lightning models are in tests/test_real_models.py; GPT-2's tied weight is checked here on the real one.
"""

from __future__ import annotations

import pytest
from torch import nn

import manual_backprop as mb
from manual_backprop.plugins import huggingface
from manual_backprop.testing import assert_grad_parity, rule_nodes
from tests.cases import FLOAT64
from tests.scripts import load_script

# Rules each model needs for ≥ 95% (from other rule families: LayerNorm, Dropout from norm; Conv2d from conv).
NEEDS = {
    "torchvision_vit": [nn.LayerNorm, nn.Conv2d],
    "timm_vit": [nn.LayerNorm, nn.Conv2d],
    "timm_vit_layerscale": [nn.LayerNorm, nn.Conv2d],
    "torch_transformer": [nn.LayerNorm],
}


@pytest.fixture(scope="module")
def zoo():
    return load_script("zoo_transformers")


@pytest.fixture(scope="module")
def registry():
    registry = mb.Registry(builtins=True, plugins=True)
    assert not registry.plugin_failures
    return registry


@pytest.mark.parametrize("name", list(NEEDS))
def test_gradients_equal_stock(zoo, registry, name):
    model, inputs, target, loss_fn = zoo.MODELS[name]()
    model.train()  # dropout on: both runs draw the same masks
    result = assert_grad_parity(model, inputs, target, loss_fn, registry=registry, **FLOAT64)
    assert {"LinearBackward"} <= set(result.rule_nodes)


@pytest.mark.parametrize("name", list(NEEDS))
def test_at_least_95_percent_of_parameters_on_our_rules(zoo, registry, name):
    missing = [t.__name__ for t in NEEDS[name] if t not in registry]
    if missing:
        pytest.skip(f"needs rules for {', '.join(missing)} (other rule families; this branch has none)")
    model = zoo.MODELS[name]()[0]
    report = mb.report(mb.convert(model, registry=registry), registry=registry)
    assert zoo.manual_share(report) >= 0.95, str(report)


def test_gpt2_tied_weight_is_counted_once_as_manual_only_if_both_owners_are(zoo, registry):
    model = zoo.gpt2_lm()[0]
    converted = mb.convert(model, registry=registry)
    row = mb.report(converted, registry=registry).parameter("transformer.wte.weight")
    assert row.owners == ("transformer.wte.weight", "lm_head.weight") and row.status == "manual"
    assert type(converted.transformer.h[0].attn.c_attn).__module__ == huggingface.__name__
    half = mb.convert(model, registry=registry, exclude=["lm_head"])
    report = mb.report(half, registry=registry, exclude=["lm_head"])
    row = report.parameter("transformer.wte.weight")
    assert row.status == "stock" and "shared by 2 modules" in row.reason and "excluded by 'lm_head'" in row.reason
    assert report.row("transformer.wte").status == "manual"  # the module is manual; its tied weight is not
    # the summary counts every tensor once, from the per-parameter statuses
    assert report.manual_parameters == sum(p.numel for p in report.parameters if p.status == "manual")
    assert report.manual_parameters + report.stock_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,parameters", [("torchvision_vit", ["class_token", "encoder.pos_embedding"]),
                                             ("timm_vit", ["cls_token", "pos_embed"])])
def test_parameters_a_custom_forward_uses_are_listed_stock_with_the_reason(zoo, registry, name, parameters):
    report = mb.report(mb.convert(zoo.MODELS[name]()[0], registry=registry), registry=registry)
    for parameter in parameters:
        row = report.parameter(parameter)
        assert row.status == "stock" and "custom forward uses its own parameters" in row.reason
    assert "parameters on stock autograd:" in str(report)


def test_identity_modules_add_no_graph_nodes(zoo, registry):
    """timm's ViT holds Identity modules (patch_drop, norm_pre, q_norm, ls1, drop_path1, ...): none in the graph."""
    model, (x,), _, _ = zoo.timm_vit()
    converted = mb.convert(model, registry=registry)
    identities = [m for m in converted.modules() if isinstance(m, nn.Identity)]
    assert len(identities) >= 10 and all(type(m) is mb.nn.Identity for m in identities)
    nodes, stack, seen = [], [converted(x).grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node.name())
        stack += [n for n, _ in node.next_functions]
    assert not [n for n in nodes if "Identity" in n]
    assert "IdentityBackward" not in rule_nodes(converted(x))
