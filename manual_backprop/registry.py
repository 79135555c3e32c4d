"""Which torch module runs on which manual counterpart: the registry of rules.

A rule maps a stock module type (``torch.nn.Linear``) to its manual counterpart
(``manual_backprop.nn.Linear``), which must subclass it: `convert` swaps a module's
class to the counterpart, so ``isinstance``, parameters, state_dict and hooks stay
as they were. An optional predicate says which configurations the counterpart
supports: it returns None when it does, or a reason string (shown in the report)
when the module must stay on stock autograd.

    @manual_backprop.register(torch.nn.Conv2d, supports=lambda m: None if m.groups == 1 else "groups > 1")
    class Conv2d(torch.nn.Conv2d):
        def forward(self, input): ...

Registries are plain objects. `default_registry()` holds the built-in rules plus
those of installed plugins (entry-point group ``manual_backprop.rules``, loaded the
first time the registry is used); build another with `Registry(builtins=True)` or
`default_registry().copy()` and pass it to `convert(..., registry=...)`.

A plugin's entry point names an object with a ``register(registry)`` function (a
module that defines one, as ``manual_backprop.plugins.feedback_alignment`` does),
or such a function itself. It is called once per registry that loads plugins and
adds rules with ``registry.register(...)``, or whole alternative rule sets with
``registry.add_rule_set(name, factory)`` (selected as ``convert(model, registry=name)``).
A plugin that fails to import or register is skipped, with a `PluginWarning`
naming it, and leaves nothing half-registered; the failure is kept in
`Registry.plugin_failures`, so `report()` lists it and `convert(strict=True)` refuses to run
without it. A plugin may register one class under two names (transformers makes
``PytorchGELUTanh`` an alias of ``GELUTanh``): the second registration of a class the same
plugin already registered is skipped, not an error, as is registering a rule that is already
there unchanged (the same stock class, counterpart and predicate).
"""

from __future__ import annotations

import sys
import threading
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Iterator, Union

import torch

ENTRY_POINT_GROUP = "manual_backprop.rules"

# A predicate returns None (supported) or a reason why this configuration stays stock.
Supports = Callable[[torch.nn.Module], Union[str, None, bool]]


class PluginWarning(UserWarning):
    """A `manual_backprop.rules` plugin failed to load and was skipped."""


def type_name(cls: type) -> str:
    """Dotted name, by the shortest public path that reaches the class (torch.nn.Linear, not torch.nn.modules...)."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts)):
        if getattr(sys.modules.get(".".join(parts[:i])), cls.__qualname__, None) is cls:
            return f"{'.'.join(parts[:i])}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that failed to load: its entry point's name and target, and the error it raised."""

    name: str
    target: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.name!r} ({self.target}) failed to load: {self.error}"


@dataclass(frozen=True)
class Rule:
    """One registered pair: `stock` modules become `manual` when `supports` allows."""

    stock: type[torch.nn.Module]
    manual: type[torch.nn.Module]
    supports: Supports | None = None
    source: str = "user"  # "builtin", "user" or "plugin:<entry point name>"

    def unsupported_reason(self, module: torch.nn.Module) -> str | None:
        """None if `manual` can run this module, else why not."""
        if self.supports is None:
            return None
        verdict = self.supports(module)
        if verdict is None or verdict is True:
            return None
        if verdict is False:
            return f"configuration not supported by {type_name(self.manual)}"
        return str(verdict)


class Registry:
    """Stock module type → manual counterpart, plus named alternative rule sets.

    Args:
        builtins: start with the built-in rules (torch.nn.Linear → manual_backprop.nn.Linear, ...).
        plugins: load the ``manual_backprop.rules`` entry points the first time the registry is used.
    """

    def __init__(self, *, builtins: bool = False, plugins: bool = False, group: str = ENTRY_POINT_GROUP):
        self._rules: dict[type, Rule] = {}
        self._by_manual: dict[type, Rule] = {}
        self._rule_sets: dict[str, tuple[Callable[[], Registry], str]] = {}
        self._group = group
        self._plugins_pending = plugins
        self._failures: dict[str, PluginFailure] = {}
        self._lock = threading.RLock()
        # Called with the whole model after `convert` swapped its modules (a learning rule that links
        # layers, as direct feedback alignment does); `restore` undoes through each module's before_restore.
        self.model_hooks: list[Callable[[torch.nn.Module], None]] = []
        if builtins:
            for rule in _builtin_rules():
                self._add(rule, override=False)

    # ------------------------------------------------------------ registering

    def register(
        self,
        stock: type[torch.nn.Module],
        manual: type[torch.nn.Module] | None = None,
        *,
        supports: Supports | None = None,
        override: bool = False,
    ):
        """Map `stock` to `manual`. Without `manual`, returns a class decorator.

        Raises ValueError if `stock` already has a rule, unless `override=True`.
        """
        if manual is None:
            return lambda cls: self.register(stock, cls, supports=supports, override=override)
        with self._lock:
            self._load_plugins_once()  # so a clash with a plugin's rule is reported the same in any order
            old = self._rules.get(stock)
            same_plugin = self._source.startswith("plugin:") and old is not None and old.source == self._source
            if old is not None and not override and (same_plugin or (old.manual is manual and old.supports is supports)):
                return manual  # an alias of a class this plugin (or anyone, with the same rule) already registered
            self._add(Rule(stock, manual, supports, self._source), override=override)
        return manual

    def unregister(self, stock: type[torch.nn.Module]) -> Rule:
        with self._lock:
            self._load_plugins_once()
            rule = self._rules.pop(stock)
            del self._by_manual[rule.manual]
            return rule

    def add_rule_set(self, name: str, factory: Callable[[], Registry], *, override: bool = False) -> None:
        """Offer an alternative rule set under `name`: `convert(model, registry=name)` uses `factory()`."""
        with self._lock:
            if name in self._rule_sets and not override:
                raise ValueError(f"a rule set named {name!r} is already registered; pass override=True to replace it")
            self._rule_sets[name] = (factory, self._source)

    def rule_set(self, name: str) -> Registry:
        self._load_plugins_once()
        if name not in self._rule_sets:
            raise KeyError(f"no rule set named {name!r}; available: {sorted(self._rule_sets) or 'none'}")
        registry = self._rule_sets[name][0]()
        if not isinstance(registry, Registry):
            raise TypeError(f"rule set {name!r} factory returned {type(registry).__name__}, not a Registry")
        return registry

    def rule_set_names(self) -> list[str]:
        self._load_plugins_once()
        return sorted(self._rule_sets)

    def _add(self, rule: Rule, *, override: bool) -> None:
        stock, manual = rule.stock, rule.manual
        for role, cls in (("stock", stock), ("manual", manual)):
            if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
                raise TypeError(f"{role} must be a torch.nn.Module subclass, got {cls!r}")
        if not issubclass(manual, stock) or manual is stock:
            # convert swaps the module's class, which keeps state only for a subclass.
            raise TypeError(f"manual counterpart {type_name(manual)} must be a strict subclass of {type_name(stock)}")
        if "__slots__" in vars(manual):
            raise TypeError(f"{type_name(manual)} defines __slots__; convert cannot swap a module's class to it")
        if rule.supports is not None and not callable(rule.supports):
            raise TypeError(f"supports must be callable, got {rule.supports!r}")
        old = self._rules.get(stock)
        if old is not None and not override:
            raise ValueError(
                f"{type_name(stock)} already has a rule ({type_name(old.manual)}, from {old.source}); "
                "pass override=True to replace it"
            )
        taken = self._by_manual.get(manual)
        if taken is not None and taken.stock is not stock:
            raise ValueError(f"{type_name(manual)} is already the counterpart of {type_name(taken.stock)}")
        if old is not None:
            del self._by_manual[old.manual]
        self._rules[stock] = rule
        self._by_manual[manual] = rule

    # -------------------------------------------------------------- looking up

    def rule_for(self, stock: type) -> Rule | None:
        """The rule for exactly this type (subclasses do not inherit it: they may change forward)."""
        self._load_plugins_once()
        return self._rules.get(stock)

    def rule_of_manual(self, manual: type) -> Rule | None:
        """The rule whose counterpart is exactly this type."""
        self._load_plugins_once()
        return self._by_manual.get(manual)

    def __contains__(self, stock: object) -> bool:
        return self.rule_for(stock) is not None  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Rule]:
        self._load_plugins_once()
        return iter(list(self._rules.values()))

    def __len__(self) -> int:
        self._load_plugins_once()
        return len(self._rules)

    def __repr__(self) -> str:
        names = ", ".join(r.stock.__name__ for r in self._rules.values())
        return f"Registry({len(self._rules)} rules: {names})"

    def copy(self) -> Registry:
        """An independent registry with the same rules and rule sets (plugins already loaded)."""
        self._load_plugins_once()
        new = Registry(group=self._group)
        new._rules, new._by_manual = dict(self._rules), dict(self._by_manual)
        new._rule_sets = dict(self._rule_sets)
        new._failures = dict(self._failures)
        new.model_hooks = list(self.model_hooks)
        return new

    # ----------------------------------------------------------------- plugins

    _source = "user"  # what `register` records; set to "plugin:<name>" while a plugin registers

    @property
    def plugin_failures(self) -> list[PluginFailure]:
        """The plugins that failed to load into this registry (each also warned once, as a PluginWarning)."""
        self._load_plugins_once()
        return list(self._failures.values())

    def reload_plugins(self) -> None:
        """Forget every plugin's rules and load the entry points again (e.g. after installing one)."""
        with self._lock:
            self._rules = {s: r for s, r in self._rules.items() if not r.source.startswith("plugin:")}
            self._by_manual = {r.manual: r for r in self._rules.values()}
            self._rule_sets = {n: v for n, v in self._rule_sets.items() if not v[1].startswith("plugin:")}
            self._failures = {}
            self._plugins_pending = True
            self._load_plugins_once()

    def _load_plugins_once(self) -> None:
        if not self._plugins_pending:
            return
        with self._lock:
            if not self._plugins_pending:
                return
            self._plugins_pending = False  # before loading: plugins call register, which looks up
            for entry_point in sorted(entry_points(group=self._group), key=lambda ep: ep.name):
                self._load_plugin(entry_point)

    def _load_plugin(self, entry_point) -> None:
        snapshot = dict(self._rules), dict(self._by_manual), dict(self._rule_sets)
        self._source = f"plugin:{entry_point.name}"
        try:
            loaded = entry_point.load()
            hook = getattr(loaded, "register", loaded)
            if not callable(hook):
                raise TypeError(f"{entry_point.value} has no register(registry) function")
            hook(self)
        except Exception as error:  # a broken plugin must never break convert
            self._rules, self._by_manual, self._rule_sets = snapshot
            failure = PluginFailure(entry_point.name, entry_point.value, f"{type(error).__name__}: {error}")
            self._failures[entry_point.name] = failure
            warnings.warn(f"manual_backprop {failure}; it was skipped", PluginWarning, stacklevel=4)
        finally:
            del self._source


# ------------------------------------------------------------------ built-ins


def supports_real_parameters(module: torch.nn.Module) -> str | None:
    """Our rules write real-valued backward (δ W, not δ W̄); complex weights stay on autograd."""
    for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if tensor is not None and tensor.is_complex():
            return f"{name} is complex ({tensor.dtype}); the rules are written for real tensors"
    return None


def _builtin_rules() -> list[Rule]:
    from manual_backprop import nn as mnn

    nn = torch.nn
    pairs = [
        (nn.Linear, mnn.Linear),
        (nn.Identity, mnn.Identity),
        (nn.Sigmoid, mnn.Sigmoid),
        (nn.Tanh, mnn.Tanh),
        (nn.ReLU, mnn.ReLU),
        (nn.LeakyReLU, mnn.LeakyReLU),
        (nn.ELU, mnn.ELU),
        (nn.Softplus, mnn.Softplus),
        (nn.SiLU, mnn.SiLU),
        (nn.GELU, mnn.GELU),
        (nn.Softmax, mnn.Softmax),
        (nn.MSELoss, mnn.MSELoss),
        (nn.BCELoss, mnn.BCELoss),
        (nn.BCEWithLogitsLoss, mnn.BCEWithLogitsLoss),
        (nn.CrossEntropyLoss, mnn.CrossEntropyLoss),
        # norm branch: normalisation, dropout, the activations CNNs use
        (nn.BatchNorm1d, mnn.BatchNorm1d),
        (nn.BatchNorm2d, mnn.BatchNorm2d),
        (nn.BatchNorm3d, mnn.BatchNorm3d),
        (nn.LayerNorm, mnn.LayerNorm),
        (nn.RMSNorm, mnn.RMSNorm),
        (nn.GroupNorm, mnn.GroupNorm),
        (nn.Dropout, mnn.Dropout),
        (nn.Dropout1d, mnn.Dropout1d),
        (nn.Dropout2d, mnn.Dropout2d),
        (nn.Dropout3d, mnn.Dropout3d),
        (nn.ReLU6, mnn.ReLU6),
        (nn.Hardtanh, mnn.Hardtanh),
        (nn.Hardsigmoid, mnn.Hardsigmoid),
        (nn.Hardswish, mnn.Hardswish),
        (nn.Mish, mnn.Mish),
        (nn.PReLU, mnn.PReLU),
        # convolution and pooling
        (nn.Conv1d, mnn.Conv1d),
        (nn.Conv2d, mnn.Conv2d),
        (nn.Conv3d, mnn.Conv3d),
        (nn.ConvTranspose1d, mnn.ConvTranspose1d),
        (nn.ConvTranspose2d, mnn.ConvTranspose2d),
        (nn.ConvTranspose3d, mnn.ConvTranspose3d),
        (nn.MaxPool1d, mnn.MaxPool1d),
        (nn.MaxPool2d, mnn.MaxPool2d),
        (nn.MaxPool3d, mnn.MaxPool3d),
        (nn.AvgPool1d, mnn.AvgPool1d),
        (nn.AvgPool2d, mnn.AvgPool2d),
        (nn.AvgPool3d, mnn.AvgPool3d),
        (nn.AdaptiveAvgPool1d, mnn.AdaptiveAvgPool1d),
        (nn.AdaptiveAvgPool2d, mnn.AdaptiveAvgPool2d),
        (nn.AdaptiveAvgPool3d, mnn.AdaptiveAvgPool3d),
        (nn.AdaptiveMaxPool1d, mnn.AdaptiveMaxPool1d),
        (nn.AdaptiveMaxPool2d, mnn.AdaptiveMaxPool2d),
        (nn.AdaptiveMaxPool3d, mnn.AdaptiveMaxPool3d),
        # recurrent
        (nn.RNN, mnn.RNN),
        (nn.LSTM, mnn.LSTM),
        (nn.GRU, mnn.GRU),
        (nn.RNNCell, mnn.RNNCell),
        (nn.LSTMCell, mnn.LSTMCell),
        (nn.GRUCell, mnn.GRUCell),
    ]
    rules = [Rule(stock, manual, supports_real_parameters, "builtin") for stock, manual in pairs]
    # embedding and attention
    rules += [
        Rule(nn.Embedding, mnn.Embedding, supports_embedding, "builtin"),
        Rule(nn.MultiheadAttention, mnn.MultiheadAttention, supports_real_parameters, "builtin"),
        Rule(nn.TransformerEncoderLayer, mnn.TransformerEncoderLayer, supports_transformer_layer, "builtin"),
        Rule(nn.TransformerDecoderLayer, mnn.TransformerDecoderLayer, supports_transformer_layer, "builtin"),
    ]
    return rules


# embedding and attention


def supports_embedding(module: torch.nn.Module) -> str | None:
    if module.sparse:
        return "sparse=True (sparse weight gradients); the rule gives dense ones"
    return supports_real_parameters(module)


def supports_transformer_layer(module: torch.nn.Module) -> str | None:
    """The layer's own computation is its activation when that is a function (F.relu, F.gelu)."""
    from manual_backprop.nn.attention import manual_activation

    if manual_activation(module.activation) is None:
        name = getattr(module.activation, "__qualname__", repr(module.activation))
        return f"activation function {name} has no manual rule (pass an activation module to convert it)"
    return None


_default = Registry(builtins=True, plugins=True)


def default_registry() -> Registry:
    """The registry `convert`, `restore`, `report` and `register` use when given none."""
    return _default


def register(
    stock: type[torch.nn.Module],
    manual: type[torch.nn.Module] | None = None,
    *,
    supports: Supports | None = None,
    override: bool = False,
):
    """`Registry.register` on the default registry; usable as a class decorator."""
    return _default.register(stock, manual, supports=supports, override=override)


def resolve(registry: Registry | str | None) -> Registry:
    """None → the default registry; a name → that rule set of the default registry."""
    if registry is None:
        return _default
    if isinstance(registry, str):
        return _default.rule_set(registry)
    if not isinstance(registry, Registry):
        raise TypeError(f"registry must be a Registry, a rule set name or None, got {type(registry).__name__}")
    return registry
