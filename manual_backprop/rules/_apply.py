"""Call a rule without the per-call signature binding of `Function.apply`.

`torch.autograd.Function.apply` binds its arguments to `forward`'s signature with
`inspect.signature` on every call (so `setup_context` sees defaults filled in):
about 35 µs a call on this project's 2-core benchmark machine, more than the
whole Linear forward at course sizes. Our callers pass every argument
positionally, so outside torch.func transforms and torch.compile we go straight
to the C++ apply that `Function.apply` ends in, after the same unwrapping of dead
functorch wrappers. Inside transforms or compile, the full `apply` runs.

The fast path leans on private torch internals (`torch._C._FunctionBase.apply`,
`torch._functorch.utils.unwrap_dead_wrappers`, `torch._C._are_functorch_transforms_active`).
Where a torch version lacks any of them, every call takes `Function.apply`: slower, same result.
"""

from __future__ import annotations

import torch

try:
    from torch._functorch.utils import unwrap_dead_wrappers

    _c_apply = torch._C._FunctionBase.__dict__.get("apply")
    _transforms_active = torch._C._are_functorch_transforms_active
    _is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
except (ImportError, AttributeError):  # internals moved or gone: the public path only
    _c_apply = None


def apply_rule(rule: type[torch.autograd.Function], *args):
    """`rule.apply(*args)`, with every argument of `rule.forward` given positionally."""
    if _c_apply is None or _transforms_active() or torch.compiler.is_compiling():
        return rule.apply(*args)
    for arg in args:  # a wrapper left by a finished torch.func transform: unwrap all, as `apply` does
        if isinstance(arg, torch.Tensor) and _is_wrapped(arg):
            args = unwrap_dead_wrappers(args)
            break
    return _c_apply.__get__(None, rule)(*args)
