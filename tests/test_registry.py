"""The registry: registering rules, predicates, separate registries, and plugins from real entry points."""

from __future__ import annotations

import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import manual_backprop as mb
import manual_backprop.functional as MF
import manual_backprop.nn as mnn
from manual_backprop.registry import ENTRY_POINT_GROUP, Registry
from manual_backprop.testing import rule_nodes

BUILTIN_PAIRS = {
    nn.Linear: mnn.Linear,
    nn.Identity: mnn.Identity,
    nn.Sigmoid: mnn.Sigmoid,
    nn.Tanh: mnn.Tanh,
    nn.ReLU: mnn.ReLU,
    nn.LeakyReLU: mnn.LeakyReLU,
    nn.ELU: mnn.ELU,
    nn.Softplus: mnn.Softplus,
    nn.SiLU: mnn.SiLU,
    nn.GELU: mnn.GELU,
    nn.Softmax: mnn.Softmax,
    nn.MSELoss: mnn.MSELoss,
    nn.BCELoss: mnn.BCELoss,
    nn.BCEWithLogitsLoss: mnn.BCEWithLogitsLoss,
    nn.CrossEntropyLoss: mnn.CrossEntropyLoss,
    # norm branch
    nn.BatchNorm1d: mnn.BatchNorm1d,
    nn.BatchNorm2d: mnn.BatchNorm2d,
    nn.BatchNorm3d: mnn.BatchNorm3d,
    nn.LayerNorm: mnn.LayerNorm,
    nn.RMSNorm: mnn.RMSNorm,
    nn.GroupNorm: mnn.GroupNorm,
    nn.Dropout: mnn.Dropout,
    nn.Dropout1d: mnn.Dropout1d,
    nn.Dropout2d: mnn.Dropout2d,
    nn.Dropout3d: mnn.Dropout3d,
    nn.ReLU6: mnn.ReLU6,
    nn.Hardtanh: mnn.Hardtanh,
    nn.Hardsigmoid: mnn.Hardsigmoid,
    nn.Hardswish: mnn.Hardswish,
    nn.Mish: mnn.Mish,
    nn.PReLU: mnn.PReLU,
    # embedding and attention
    nn.Embedding: mnn.Embedding,
    nn.MultiheadAttention: mnn.MultiheadAttention,
    nn.TransformerEncoderLayer: mnn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer: mnn.TransformerDecoderLayer,
}
# convolution and pooling
BUILTIN_PAIRS.update({getattr(nn, name): getattr(mnn, name) for name in [
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
    "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
]})
# recurrent
BUILTIN_PAIRS.update({getattr(nn, name): getattr(mnn, name) for name in ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]})


class ManualSoftsign(nn.Softsign):
    """A rule a user adds: Softsign on our Elementwise machinery would go here; forward only."""

    def forward(self, input):
        return MF.identity(input).div(1 + input.abs())


def test_default_registry_holds_the_builtin_pairs():
    registry = Registry(builtins=True)
    assert {rule.stock: rule.manual for rule in registry} == BUILTIN_PAIRS
    assert all(rule.source == "builtin" for rule in registry)
    default = {rule.stock: rule.manual for rule in mb.default_registry()}
    assert all(default[stock] is manual for stock, manual in BUILTIN_PAIRS.items())


def test_register_as_decorator_and_call():
    registry = Registry()

    @registry.register(nn.Softsign)
    class Decorated(nn.Softsign):
        pass

    assert registry.rule_for(nn.Softsign).manual is Decorated
    assert registry.register(nn.Linear, mnn.Linear) is mnn.Linear
    assert nn.Linear in registry and nn.ReLU not in registry and len(registry) == 2


def test_duplicate_registration_raises_unless_override():
    registry = Registry(builtins=True)

    class Other(nn.Linear):
        pass

    with pytest.raises(ValueError, match=r"torch.nn.Linear already has a rule \(manual_backprop.nn.Linear, from builtin\)"):
        registry.register(nn.Linear, Other)
    registry.register(nn.Linear, Other, override=True)
    assert registry.rule_for(nn.Linear).manual is Other
    assert registry.rule_of_manual(mnn.Linear) is None  # the replaced counterpart is forgotten


@pytest.mark.parametrize(
    "stock, manual, message",
    [
        (nn.Linear, nn.Linear, "strict subclass"),
        (nn.Linear, mnn.ReLU, "strict subclass"),
        (nn.Linear, int, "torch.nn.Module subclass"),
        ("Linear", mnn.Linear, "torch.nn.Module subclass"),
    ],
)
def test_register_rejects_pairs_convert_cannot_swap(stock, manual, message):
    with pytest.raises(TypeError, match=message):
        Registry().register(stock, manual)


def test_predicate_reason_keeps_a_configuration_stock():
    registry = Registry(builtins=True)
    registry.register(
        nn.Linear,
        mnn.Linear,
        supports=lambda m: None if m.out_features < 10 else f"out_features={m.out_features} is too wide",
        override=True,
    )
    model = mb.convert(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 12)), registry=registry)
    assert type(model[0]) is mnn.Linear and type(model[1]) is nn.Linear
    report = mb.report(model, registry=registry)
    assert report.row("1").reason == "unsupported configuration: out_features=12 is too wide"


def test_boolean_predicates_are_accepted():
    registry = Registry()
    registry.register(nn.Linear, mnn.Linear, supports=lambda m: m.bias is not None)
    model = mb.convert(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, bias=False)), registry=registry)
    assert [type(m) for m in model] == [mnn.Linear, nn.Linear]
    assert "not supported by manual_backprop.nn.Linear" in mb.report(model, registry=registry).row("1").reason


def test_a_separate_registry_changes_nothing_global():
    registry = Registry(builtins=True)
    registry.register(nn.Softsign, ManualSoftsign)
    model = nn.Sequential(nn.Linear(2, 2), nn.Softsign())
    assert type(mb.convert(model, registry=registry)[1]) is ManualSoftsign
    assert type(mb.convert(model)[1]) is nn.Softsign
    assert nn.Softsign not in mb.default_registry()


def test_top_level_register_uses_the_default_registry():
    try:
        mb.register(nn.Softsign)(ManualSoftsign)
        assert type(mb.convert(nn.Softsign())) is ManualSoftsign
        mb.register(nn.Softsign, ManualSoftsign)  # the same rule again: nothing changes
        with pytest.raises(ValueError, match="already has a rule"):
            mb.register(nn.Softsign, type("OtherSoftsign", (nn.Softsign,), {}))
    finally:
        mb.default_registry().unregister(nn.Softsign)
    assert nn.Softsign not in mb.default_registry()


def test_copy_is_independent():
    copy = mb.default_registry().copy()
    copy.unregister(nn.Linear)
    assert nn.Linear in mb.default_registry() and nn.Linear not in copy
    assert type(mb.convert(nn.Linear(2, 2), registry=copy)) is nn.Linear


def test_unknown_rule_set_names_the_known_ones():
    with pytest.raises(KeyError, match="feedback_alignment"):
        mb.convert(nn.Linear(2, 2), registry="no_such_rules")
    with pytest.raises(TypeError, match="registry must be"):
        mb.convert(nn.Linear(2, 2), registry=3)


# ------------------------------------------------------------------- plugins

GOOD_PLUGIN = '''
    import torch
    import manual_backprop.functional as MF

    class Softsign(torch.nn.Softsign):
        def forward(self, input):
            return MF.identity(input).div(1 + input.abs())

    def register(registry):
        registry.register(torch.nn.Softsign, Softsign)
'''
BROKEN_PLUGIN = """
    raise ImportError("this plugin is broken on purpose")
"""
HALF_PLUGIN = """
    import torch

    class Tanhshrink(torch.nn.Tanhshrink):
        pass

    def register(registry):
        registry.register(torch.nn.Tanhshrink, Tanhshrink)
        registry.register(torch.nn.Linear, Tanhshrink)  # invalid: must not leave Tanhshrink behind
"""


def _install_fake_distribution(root, name, modules: dict[str, str], entry_points: dict[str, str]):
    """What pip writes for a package: its modules plus a dist-info folder with entry_points.txt."""
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "\n".join(f"{ep} = {target}" for ep, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}\n")


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A folder on sys.path for fake distributions; the default registry loads its plugins before, never these."""
    len(mb.default_registry())
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("fake_softsign_rules", "fake_broken_rules", "fake_half_rules", "fake_clash_rules", "fake_alias_rules"):
        sys.modules.pop(name, None)


def test_plugin_from_a_real_entry_point(plugin_path):
    _install_fake_distribution(plugin_path, "fake_plugin", {"fake_softsign_rules": GOOD_PLUGIN}, {"softsign": "fake_softsign_rules"})
    registry = Registry(builtins=True, plugins=True)  # lazy: nothing loaded until first use
    assert "fake_softsign_rules" not in sys.modules
    with warnings.catch_warnings():
        warnings.simplefilter("error", mb.PluginWarning)
        model = mb.convert(nn.Sequential(nn.Linear(3, 3), nn.Softsign()), registry=registry)
    assert type(model[1]).__module__ == "fake_softsign_rules"
    assert registry.rule_for(nn.Softsign).source == "plugin:softsign"
    x = torch.randn(4, 3, requires_grad=True)
    assert "IdentityBackward" in rule_nodes(model(x).sum())
    assert "feedback_alignment" in registry.rule_set_names()  # this package's own entry point


def test_broken_plugin_warns_by_name_and_convert_still_works(plugin_path):
    _install_fake_distribution(plugin_path, "fake_broken", {"fake_broken_rules": BROKEN_PLUGIN}, {"broken": "fake_broken_rules"})
    registry = Registry(builtins=True, plugins=True)
    with pytest.warns(mb.PluginWarning, match=r"plugin 'broken' \(fake_broken_rules\) failed to load.*broken on purpose"):
        model = mb.convert(nn.Sequential(nn.Linear(3, 3)), registry=registry)
    assert type(model[0]) is mnn.Linear
    assert "feedback_alignment" in registry.rule_set_names()  # the other plugins still loaded


def test_failing_plugin_leaves_nothing_half_registered(plugin_path):
    _install_fake_distribution(plugin_path, "fake_half", {"fake_half_rules": HALF_PLUGIN}, {"half": "fake_half_rules"})
    registry = Registry(builtins=True, plugins=True)
    with pytest.warns(mb.PluginWarning, match="'half'.*strict subclass"):
        assert nn.Tanhshrink not in registry
    assert registry.rule_for(nn.Linear).manual is mnn.Linear


def test_reload_plugins_picks_up_a_newly_installed_one(plugin_path):
    registry = Registry(builtins=True, plugins=True)
    assert nn.Softsign not in registry  # loads the installed plugins now
    _install_fake_distribution(plugin_path, "fake_plugin", {"fake_softsign_rules": GOOD_PLUGIN}, {"softsign": "fake_softsign_rules"})
    assert nn.Softsign not in registry  # loaded once, lazily
    registry.reload_plugins()
    assert nn.Softsign in registry
    registry.reload_plugins()  # reloading does not trip over the plugin's own earlier registration
    assert registry.rule_for(nn.Softsign).source == "plugin:softsign"


def test_plugin_clashing_with_a_builtin_is_skipped_with_a_warning(plugin_path):
    clash = """
        import torch
        class Linear(torch.nn.Linear):
            pass
        def register(registry):
            registry.register(torch.nn.Linear, Linear)
    """
    _install_fake_distribution(plugin_path, "fake_clash", {"fake_clash_rules": clash}, {"clash": "fake_clash_rules"})
    registry = Registry(builtins=True, plugins=True)
    with pytest.warns(mb.PluginWarning, match="'clash'.*already has a rule"):
        assert registry.rule_for(nn.Linear).manual is mnn.Linear


ALIAS_PLUGIN = """
    import torch
    import manual_backprop.functional as MF

    Softsign = torch.nn.Softsign
    SoftsignAlias = torch.nn.Softsign  # one class under two names, as transformers has GELUTanh/PytorchGELUTanh

    class ManualSoftsign(torch.nn.Softsign):
        def forward(self, input):
            return MF.identity(input).div(1 + input.abs())

    def register(registry):
        for stock in (Softsign, SoftsignAlias):
            registry.register(stock, ManualSoftsign)
"""


def test_a_plugin_registering_an_alias_of_its_own_class_loads_whole(plugin_path):
    _install_fake_distribution(plugin_path, "fake_alias", {"fake_alias_rules": ALIAS_PLUGIN}, {"alias": "fake_alias_rules"})
    registry = Registry(builtins=True, plugins=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mb.PluginWarning)
        assert registry.rule_for(nn.Softsign).source == "plugin:alias"
    assert registry.plugin_failures == []
    with pytest.raises(ValueError, match="already has a rule"):  # a user's clash still is one
        registry.register(nn.Softsign, type("Softsign2", (nn.Softsign,), {}))


def test_registering_the_same_rule_again_changes_nothing():
    registry = Registry(builtins=True)
    rule = registry.rule_for(nn.Linear)
    registry.register(nn.Linear, rule.manual, supports=rule.supports)  # what a plugin's register() does for an alias
    assert registry.rule_for(nn.Linear) is rule
    with pytest.raises(ValueError, match="already has a rule"):  # another predicate is another rule
        registry.register(nn.Linear, rule.manual)


def test_a_failed_plugin_is_named_by_report_and_refused_by_strict_convert(plugin_path):
    _install_fake_distribution(plugin_path, "fake_broken", {"fake_broken_rules": BROKEN_PLUGIN}, {"broken": "fake_broken_rules"})
    registry = Registry(builtins=True, plugins=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mb.PluginWarning)  # a filter that hides the warning hides nothing else
        failures = registry.plugin_failures
        model = nn.Sequential(nn.Linear(3, 3))
        [failure] = failures
        assert (failure.name, failure.target) == ("broken", "fake_broken_rules")
        assert "broken on purpose" in failure.error
        report = mb.report(mb.convert(model, registry=registry), registry=registry)
        assert report.plugin_failures == (failure,)
        assert "plugins that failed to load" in str(report) and "'broken' (fake_broken_rules)" in str(report)
        assert "1 plugin(s) failed to load" in report.summary()
        with pytest.raises(mb.ConversionError, match=r"(?s)plugins failed to load.*'broken'.*broken on purpose"):
            mb.convert(model, registry=registry, strict=True)
    with pytest.warns(mb.PluginWarning):  # failures are forgotten with the plugins, and found again on reload
        registry.reload_plugins()
        assert [f.name for f in registry.plugin_failures] == ["broken"]


def test_report_of_a_registry_whose_plugins_all_loaded_names_no_failure():
    report = mb.report(nn.Sequential(nn.Linear(2, 2)))
    assert report.plugin_failures == () and "failed to load" not in str(report)
