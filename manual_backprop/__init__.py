"""manual-backprop: backpropagation written out by hand, as PyTorch autograd rules.

    import manual_backprop.functional as MF   # torch.nn.functional, our backward
    import manual_backprop.nn as mnn          # drop-in torch.nn modules
"""

from manual_backprop import functional, nn, rules
from manual_backprop._checks import InputError, TargetIndexError, debug_checks, set_debug_checks

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "TargetIndexError",
    "debug_checks",
    "functional",
    "nn",
    "rules",
    "set_debug_checks",
]
