"""manual-backprop: backpropagation written out by hand, as PyTorch autograd rules.

    import manual_backprop.functional as MF   # torch.nn.functional, our backward
    import manual_backprop.nn as mnn          # drop-in torch.nn modules
    model = manual_backprop.convert(model)     # swap our rules into an existing model
    print(manual_backprop.report(model))       # what runs where
"""

from manual_backprop import functional, nn, rules
from manual_backprop._checks import InputError, TargetIndexError, debug_checks, set_debug_checks
from manual_backprop.convert import ConversionError, ModuleReport, Report, convert, report, restore
from manual_backprop.mode import ManualFunctions, manual_functions
from manual_backprop.registry import PluginFailure, PluginWarning, Registry, Rule, default_registry, register
from manual_backprop import testing  # noqa: E402  (uses convert and mode above)
from manual_backprop.per_sample import per_sample_grads  # noqa: E402  (per-sample gradients)
from manual_backprop import privacy  # noqa: E402  (DP-SGD on the per-sample norms)
# the δ tape
from manual_backprop.tape import Tape, tape  # noqa: E402
# learning rules
from manual_backprop.learning_rules import LayerAlignment, alignment, learning_rule_names  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "InputError",
    "ManualFunctions",
    "ModuleReport",
    "PluginFailure",
    "PluginWarning",
    "Registry",
    "Report",
    "Rule",
    "TargetIndexError",
    "convert",
    "debug_checks",
    "default_registry",
    "functional",
    "manual_functions",
    "per_sample_grads",
    "privacy",
    "nn",
    "register",
    "report",
    "restore",
    "rules",
    "set_debug_checks",
    "testing",
    # the δ tape
    "Tape",
    "tape",
    # learning rules
    "LayerAlignment",
    "alignment",
    "learning_rule_names",
]
