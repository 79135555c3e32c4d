"""Put manual rules into an existing model, take them out again, and report what runs where.

    model = manual_backprop.convert(model)      # a converted deep copy; inplace=True converts model itself
    print(manual_backprop.report(model))         # which modules run our rules, which stay stock, and why
    model = manual_backprop.restore(model)      # back to stock torch modules

How a module is converted: its class is swapped for the registered manual counterpart
(`module.__class__ = manual`), which subclasses the stock class and overrides forward
only. Swapping the class, rather than building a new module around a copied
``__dict__``, keeps the module *object*: every reference to it (a second parent that
shares it, a user's variable, a hook's closure, the root itself) sees the converted
module, and no two objects end up aliasing one ``_parameters`` dict. Parameters,
buffers, state_dict keys, device, dtype, training mode and every registered hook are
the module's own attributes, so they are untouched by construction. A counterpart
that needs extra state (feedback alignment's fixed matrix B) creates it in an optional
``after_convert(self)`` method and removes it in ``before_restore(self)``.

Rules match exact types, and subclasses that keep their base's forward: a subclass of
torch.nn.Linear that does not override forward (torch's NonDynamicallyQuantizableLinear)
computes exactly what torch.nn.Linear computes, so it converts like its base, to a class
made once per subclass that derives from both the counterpart and the subclass (so
`isinstance` still holds and restore gives the subclass back). A subclass that overrides
forward may compute something else, which a swap would silently drop, so it stays stock
and the report says so.

The report counts a parameter as manual only if every module that owns it is manual (a
weight tied between an embedding and an output layer), and lists, per parameter, those
left on stock autograd with the reason: a parameter a custom forward uses directly (a
ViT's class token) gets its gradient from autograd.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Sequence, TypeVar, Union

import torch
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from manual_backprop.registry import PluginFailure, Registry, Rule, default_registry, resolve, type_name

__all__ = ["ConversionError", "ModuleReport", "ParameterReport", "Report", "convert", "report", "restore"]

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)
Pattern = Union[str, type]  # a qualified-name glob ("encoder.*") or a module type
Patterns = Union[Pattern, Iterable[Pattern], None]

MANUAL, STOCK, CONTAINER = "manual", "stock", "container"
_PURE_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
# Modules that only reshape (views of their input): nothing to differentiate, so no rule is needed.
_VIEWS = (torch.nn.Flatten, torch.nn.Unflatten)


class ConversionError(RuntimeError):
    """`convert(strict=True)` found modules with parameters that would stay on stock autograd."""


@dataclass(frozen=True)
class ModuleReport:
    """One module of the model: where its own computation runs, and why.

    status: "manual" (our rules), "stock" (torch autograd), or "container" (no
    parameters or buffers of its own; it only calls its children).
    parameters: number of elements in the module's own (not its children's) parameters.
    """

    name: str
    type: str
    status: str
    reason: str
    parameters: int


@dataclass(frozen=True)
class ParameterReport:
    """One parameter tensor (counted once however many modules share it).

    status: "manual" if every module that owns it runs on our rules, else "stock".
    owners: the qualified names of the modules that own it (two for a tied weight).
    """

    name: str
    owners: tuple[str, ...]
    status: str
    reason: str
    numel: int


@dataclass(frozen=True)
class Report(Sequence[ModuleReport]):
    """What runs where, one row per (qualified name, module); a shared module appears under each name.

    `manual_parameters` / `stock_parameters` count each parameter tensor once, from `parameters`
    (one `ParameterReport` per tensor), so the summary agrees with the per-parameter statuses.
    """

    rows: tuple[ModuleReport, ...]
    manual_parameters: int
    stock_parameters: int
    parameters: tuple[ParameterReport, ...] = ()
    plugin_failures: tuple[PluginFailure, ...] = ()  # plugins of the registry that failed to load

    def __getitem__(self, index):  # type: ignore[override]
        return self.rows[index]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[ModuleReport]:
        return iter(self.rows)

    def row(self, name: str) -> ModuleReport:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no module named {name!r} in the report")

    def names(self, status: str) -> list[str]:
        return [row.name for row in self.rows if row.status == status]

    @property
    def manual(self) -> list[ModuleReport]:
        return [row for row in self.rows if row.status == MANUAL]

    @property
    def stock(self) -> list[ModuleReport]:
        return [row for row in self.rows if row.status == STOCK]

    def to_dicts(self) -> list[dict]:
        return [asdict(row) for row in self.rows]

    def parameter(self, name: str) -> ParameterReport:
        for row in self.parameters:
            if row.name == name:
                return row
        raise KeyError(f"no parameter named {name!r} in the report")

    @property
    def stock_parameter_rows(self) -> list[ParameterReport]:
        """The parameters whose gradients come from stock autograd, with why."""
        return [row for row in self.parameters if row.status == STOCK]

    def summary(self) -> str:
        counts = {s: sum(row.status == s for row in self.rows) for s in (MANUAL, STOCK, CONTAINER)}
        total = self.manual_parameters + self.stock_parameters
        share = f", {100 * self.manual_parameters / total:.1f}% of parameters on manual rules" if total else ""
        failed = f"; {len(self.plugin_failures)} plugin(s) failed to load" if self.plugin_failures else ""
        return (
            f"{counts[MANUAL]} manual ({self.manual_parameters} parameters), "
            f"{counts[STOCK]} stock ({self.stock_parameters} parameters), {counts[CONTAINER]} containers{share}{failed}"
        )

    def __str__(self) -> str:
        header = ("module", "type", "status", "params", "reason")
        cells = [header] + [
            (row.name or "(root)", row.type, row.status, str(row.parameters), row.reason) for row in self.rows
        ]
        widths = [max(len(c[i]) for c in cells) for i in range(4)]
        lines = ["  ".join(c[i].ljust(widths[i]) for i in range(4)) + "  " + c[4] for c in cells]
        lines.insert(1, "-" * (sum(widths) + 8 + len(header[4])))
        stock = self.stock_parameter_rows
        if stock:
            lines += ["", "parameters on stock autograd:"] + [f"  {p.name} ({p.numel}): {p.reason}" for p in stock]
        if self.plugin_failures:
            lines += ["", "plugins that failed to load (their rules are missing):"] + [f"  {f}" for f in self.plugin_failures]
        return "\n".join(line.rstrip() for line in lines) + "\n" + self.summary()


# ----------------------------------------------------------------- planning


@dataclass
class _Occurrence:
    name: str
    module: torch.nn.Module
    status: str
    reason: str
    rule: Rule | None = None  # set when the module can be converted
    deselected: bool = False  # left stock because of include/exclude (strict mode accepts that)
    subclass: bool = False  # the rule is its base's: it converts to `_subclass_counterpart(rule, type)`


def _walk(module: torch.nn.Module, prefix: str = "", ancestors: tuple = ()):
    yield prefix, module, ancestors
    for child_name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}.{child_name}" if prefix else child_name, (*ancestors, (prefix, module)))


def _patterns(patterns: Patterns) -> tuple[Pattern, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, (str, type)):
        return (patterns,)
    patterns = tuple(patterns)
    for p in patterns:
        if not isinstance(p, (str, type)):
            raise TypeError(f"include/exclude take module types or qualified-name patterns, got {p!r}")
    return patterns


def _matches(pattern: Pattern, name: str, module: torch.nn.Module) -> bool:
    if isinstance(pattern, str):
        return fnmatch.fnmatchcase(name, pattern)
    return isinstance(module, pattern)


def _show(pattern: Pattern) -> str:
    return pattern.__name__ if isinstance(pattern, type) else repr(pattern)


def _deselection(name, module, ancestors, include, exclude) -> str | None:
    """Why include/exclude keep this module stock; a pattern covers the module and everything under it."""
    chain = [*ancestors, (name, module)]
    if include and not any(_matches(p, n, m) for n, m in chain for p in include):
        return f"not selected by include=[{', '.join(map(_show, include))}]"
    for n, m in chain:
        for p in exclude:
            if _matches(p, n, m):
                return f"excluded by {_show(p)}" + (f" (matched {n or '(root)'!r})" if n != name else "")
    return None


def _known_manual(registry: Registry) -> dict[type, Rule]:
    """Counterpart class → rule, from `registry` and every rule set of the default registry.

    A feedback-alignment module is a manual module whichever registry is asked, so the
    report and restore recognise counterparts from any known rule set.
    """
    known: dict[type, Rule] = {}
    default = default_registry()
    for name in default.rule_set_names():
        known.update({rule.manual: rule for rule in default.rule_set(name)})
    known.update({rule.manual: rule for rule in default})
    known.update({rule.manual: rule for rule in registry})
    return known


# ------------------------------------------------- subclasses with their base's forward

SUBCLASS_REASON = "subclass with the base's forward"
# (counterpart, stock subclass) -> the class a module of that subclass converts to, and back.
_SUBCLASS_COUNTERPARTS: dict[tuple[type, type], type] = {}
_SUBCLASS_OF: dict[type, tuple[Rule, type]] = {}


def _base_rule(registry: Registry, module: torch.nn.Module) -> Rule | None:
    """The rule of `module`'s nearest registered base, if its class keeps that base's forward.

    Lazy modules become their base after one forward pass, and parametrized modules have
    their class swapped by torch.nn.utils.parametrize itself: neither is taken here.
    """
    cls = type(module)
    if isinstance(module, LazyModuleMixin) or torch.nn.utils.parametrize.is_parametrized(module):
        return None
    for base in cls.__mro__[1:]:
        rule = registry.rule_for(base)
        if rule is not None:
            return rule if cls.forward is base.forward and not _overridden_methods(cls, base) else None
    return None


def _overridden_methods(cls: type, base: type) -> list[str]:
    """Methods (other than __init__ and repr helpers) that `cls` defines between itself and `base`.

    The base's forward may call them (TransformerEncoderLayer.forward calls self._ff_block), and our
    counterpart's forward would not; parameters a subclass adds in __init__ are used by no forward.
    """
    allowed = {"extra_repr", "_get_name"}
    names = []
    for klass in cls.__mro__[: cls.__mro__.index(base)]:
        for name, value in vars(klass).items():
            if name.startswith("__") or name in allowed:
                continue
            if callable(value) or isinstance(value, (property, staticmethod, classmethod)):
                names.append(name)
    return names


def _subclass_counterpart(rule: Rule, cls: type) -> type:
    """class (rule.manual, cls): the counterpart's forward, and still an instance of `cls`. Made once per pair.

    Named like the subclass (so repr is unchanged) and reachable from this module, so a
    converted model pickles by reference within the process.
    """
    key = (rule.manual, cls)
    counterpart = _SUBCLASS_COUNTERPARTS.get(key)
    if counterpart is None:
        # a module-level name without dots: pickle (protocol 2, torch.save's) finds it by reference
        unique = f"_{rule.manual.__module__}.{rule.manual.__qualname__}__{cls.__module__}.{cls.__qualname__}"
        unique = unique.replace(".", "_")
        doc = f"{type_name(cls)} running {type_name(rule.manual)}'s forward (made by manual_backprop.convert)."
        namespace = {"__module__": __name__, "__qualname__": unique, "__doc__": doc}
        counterpart = type(cls.__name__, (rule.manual, cls), namespace)  # same name: same repr as the subclass
        globals()[unique] = counterpart
        _SUBCLASS_COUNTERPARTS[key] = counterpart
        _SUBCLASS_OF[counterpart] = (rule, cls)
    return counterpart


def _classify(name, module, ancestors, registry, known, include, exclude) -> _Occurrence:
    cls = type(module)
    if cls in known:
        return _Occurrence(name, module, MANUAL, f"rule {type_name(cls)}")
    if cls in _SUBCLASS_OF:
        return _Occurrence(name, module, MANUAL, f"rule {type_name(_SUBCLASS_OF[cls][0].manual)}: {SUBCLASS_REASON}")
    rule, subclass = registry.rule_for(cls), False
    if rule is None:
        rule = _base_rule(registry, module)
        subclass = rule is not None
    if rule is not None:
        how = f": {SUBCLASS_REASON}" if subclass else ""
        if "forward" in vars(module):
            return _Occurrence(name, module, STOCK, "forward is overridden on this instance, so a rule would not run")
        reason = rule.unsupported_reason(module)
        if reason is not None:
            return _Occurrence(name, module, STOCK, f"unsupported configuration: {reason}")
        deselected = _deselection(name, module, ancestors, include, exclude)
        if deselected is not None:
            return _Occurrence(name, module, STOCK, deselected, deselected=True)
        return _Occurrence(
            name, module, STOCK, f"not converted (rule {type_name(rule.manual)} is available{how})", rule, subclass=subclass
        )
    if cls in _VIEWS:
        return _Occurrence(name, module, CONTAINER, "a view (reshape only): nothing to differentiate, no rule needed")
    own_state = next(module.parameters(recurse=False), None) is not None or next(
        module.buffers(recurse=False), None
    ) is not None
    base = next((b for b in cls.__mro__[1:] if registry.rule_for(b) is not None), None)
    if not own_state and module._modules:
        if isinstance(module, _PURE_CONTAINERS):
            return _Occurrence(name, module, CONTAINER, "runs its children")
        why = ""
        if base is not None and cls.forward is base.forward:
            why = f" (subclass of {type_name(base)} that overrides {', '.join(_overridden_methods(cls, base))})"
        return _Occurrence(
            name, module, CONTAINER,
            f"custom forward{why}: torch functions it calls run on autograd unless manual_functions()",
        )
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return _Occurrence(name, module, STOCK, "lazy module not materialised yet: run one forward pass, then convert")
    reason = f"no rule registered for {type_name(cls)}"
    if base is not None and torch.nn.utils.parametrize.is_parametrized(module):
        reason += f" (subclass of {type_name(base)} made by torch.nn.utils.parametrize, which swaps the class itself)"
    elif base is not None and cls.forward is not base.forward:
        reason += f" (subclass of {type_name(base)} that overrides forward, which a rule would drop)"
    elif base is not None:
        names = ", ".join(_overridden_methods(cls, base))
        reason += f" (subclass of {type_name(base)} that overrides {names}, which its forward may call)"
    elif own_state and module._modules:
        names = ", ".join(n for n, _ in module.named_parameters(recurse=False))
        if names:
            reason += f"; its custom forward uses its own parameters ({names}) directly, on stock autograd"
    return _Occurrence(name, module, STOCK, reason)


def _plan(model, registry, include, exclude) -> list[_Occurrence]:
    include, exclude = _patterns(include), _patterns(exclude)
    known = _known_manual(registry)
    plan = [_classify(n, m, a, registry, known, include, exclude) for n, m, a in _walk(model)]
    # A module shared under several names is one object: convert it only if every name allows it.
    by_module: dict[int, list[_Occurrence]] = {}
    for occ in plan:
        by_module.setdefault(id(occ.module), []).append(occ)
    for occurrences in by_module.values():
        blocked = [o for o in occurrences if o.deselected]
        if blocked:
            for occ in occurrences:
                if occ.rule is not None:
                    occ.rule, occ.deselected = None, True
                    occ.reason = f"shared with {blocked[0].name!r}, which is {blocked[0].reason}"
    return plan


def _own_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return list(module.parameters(recurse=False))


def _numel(p: torch.Tensor) -> int:
    return 0 if isinstance(p, UninitializedParameter) else p.numel()


def _parameter_reports(plan: list[_Occurrence]) -> list[ParameterReport]:
    """One row per parameter tensor: manual only if every module owning it (under any name) is manual."""
    owners: dict[int, list[tuple[str, _Occurrence]]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for occ in plan:
        for pname, p in occ.module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((f"{occ.name}.{pname}" if occ.name else pname, occ))
            tensors[id(p)] = p
    rows = []
    for key, uses in owners.items():
        names = tuple(dict.fromkeys(n for n, _ in uses))
        modules = {id(o.module): o for _, o in uses}.values()
        stock = [o for o in modules if o.status != MANUAL]
        if not stock:
            status, reason = MANUAL, "every module owning it runs on manual rules"
        else:
            status, first = STOCK, stock[0]
            reason = f"owned by {first.name or '(root)'!r} ({type_name(type(first.module))}): {first.reason}"
            if len(modules) > 1:
                reason = f"shared by {len(modules)} modules, not all manual; " + reason
        rows.append(ParameterReport(names[0], names, status, reason, _numel(tensors[key])))
    return rows


def _report_from(plan: list[_Occurrence], registry: Registry) -> Report:
    parameters = _parameter_reports(plan)
    stock_names = {name for p in parameters if p.status == STOCK for name in p.owners}
    rows = []
    for occ in plan:
        params = _own_parameters(occ.module)
        reason = occ.reason
        if occ.status == MANUAL:  # a manual module whose parameter another, stock, module shares
            shared = [n for n, _ in occ.module.named_parameters(recurse=False)
                      if (f"{occ.name}.{n}" if occ.name else n) in stock_names]
            if shared:
                reason += f"; {', '.join(shared)} shared with a stock module: counted as stock"
        rows.append(ModuleReport(occ.name, type_name(type(occ.module)), occ.status, reason, sum(map(_numel, params))))
    totals = {status: sum(p.numel for p in parameters if p.status == status) for status in (MANUAL, STOCK)}
    return Report(tuple(rows), totals[MANUAL], totals[STOCK], tuple(parameters), tuple(registry.plugin_failures))


# ---------------------------------------------------------------------- API


def _copy_of(model: ModuleT, verb: str) -> ModuleT:
    try:
        return copy.deepcopy(model)
    except Exception as error:
        raise RuntimeError(
            f"{verb}(inplace=False) deep-copies the model to leave yours untouched, and the copy failed "
            f"({type(error).__name__}: {error}); pass inplace=True to {verb} the model itself"
        ) from error


def convert(
    model: ModuleT,
    *,
    inplace: bool = False,
    strict: bool = False,
    include: Patterns = None,
    exclude: Patterns = None,
    registry: Registry | str | None = None,
) -> ModuleT:
    """Replace every module that has a registered rule by its manual counterpart, at any depth.

    Args:
        model: any torch.nn.Module (the root itself may be converted).
        inplace: convert `model` itself (same module and Parameter objects, so an optimizer
            built before keeps working). Otherwise a deep copy is converted and `model` is untouched.
        strict: raise ConversionError, naming each, if a module with parameters of its own would
            stay on stock autograd (modules left out by include/exclude are accepted), or if a plugin
            of the registry failed to load (its rules would be silently missing).
        include: only modules matching one of these (types, or fnmatch patterns on qualified
            names; a match covers the whole subtree) are converted.
        exclude: modules matching one of these (same forms) stay stock.
        registry: a Registry, the name of a rule set (e.g. "feedback_alignment"), or None (default).

    Converting a converted model changes nothing. `report(model)` says what runs where.
    """
    registry = resolve(registry)
    plan = _plan(model, registry, include, exclude)
    if strict:
        offenders = [o for o in plan if o.status == STOCK and o.rule is None and not o.deselected and _own_parameters(o.module)]
        problems = [f"  {o.name or '(root)'} ({type_name(type(o.module))}): {o.reason}" for o in offenders]
        if offenders:
            problems.insert(0, "modules with parameters would stay on stock autograd:")
        if registry.plugin_failures:
            problems += ["plugins failed to load, so their rules are missing:"] + [f"  {f}" for f in registry.plugin_failures]
        if problems:
            raise ConversionError("convert(strict=True): " + "\n".join(problems))
    if not inplace:
        model = _copy_of(model, "convert")
        plan = _plan(model, registry, include, exclude)
    done: set[int] = set()
    for occ in plan:
        if occ.rule is not None and id(occ.module) not in done:
            done.add(id(occ.module))
            occ.module.__class__ = _subclass_counterpart(occ.rule, type(occ.module)) if occ.subclass else occ.rule.manual
            after_convert = getattr(occ.module, "after_convert", None)
            if after_convert is not None:
                after_convert()
    for hook in registry.model_hooks:
        hook(model)
    return model


def restore(model: ModuleT, *, inplace: bool = False, registry: Registry | str | None = None) -> ModuleT:
    """Turn every manual module back into its stock torch class; parameters, buffers and hooks unchanged.

    Recognises counterparts of `registry` and of every rule set of the default registry.
    """
    known = _known_manual(resolve(registry))
    if not inplace:
        model = _copy_of(model, "restore")
    done: set[int] = set()
    for _, module, _ in _walk(model):
        rule = known.get(type(module))
        stock = None if rule is None else rule.stock
        if type(module) in _SUBCLASS_OF:  # back to the subclass it was, whichever registry made it
            stock = _SUBCLASS_OF[type(module)][1]
        if stock is not None and id(module) not in done:
            done.add(id(module))
            before_restore = getattr(module, "before_restore", None)
            if before_restore is not None:
                before_restore()
            module.__class__ = stock
    return model


def report(
    model: torch.nn.Module,
    *,
    registry: Registry | str | None = None,
    include: Patterns = None,
    exclude: Patterns = None,
) -> Report:
    """What runs where in `model` now: one row per module, as data; `str(report)` is a table.

    Computed from the model itself (its modules' classes), so it is never stale. Pass the
    include/exclude given to convert to have them named as the reasons.
    """
    registry = resolve(registry)
    return _report_from(_plan(model, registry, include, exclude), registry)
