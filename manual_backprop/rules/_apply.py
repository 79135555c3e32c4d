"""Call a rule without the per-call signature binding of `Function.apply`.

`torch.autograd.Function.apply` binds its arguments to `forward`'s signature with
`inspect.signature` on every call (so `setup_context` sees defaults filled in):
about 35 µs a call on this project's 2-core benchmark machine, more than the
whole Linear forward at course sizes. Our callers pass every argument
positionally, so outside torch.func transforms and torch.compile we go straight
to the C++ apply that `Function.apply` ends in, after the same unwrapping of dead
functorch wrappers. Inside transforms or compile, the full `apply` runs.

Backward has the same kind of plumbing: autograd's engine calls the graph node's
`apply`, which for a Python Function is `BackwardCFunction.apply`, two Python
frames that look up and call `rule.backward`. `direct_backward` makes the node's
`apply` one frame that calls `rule.backward` (what those frames would call anyway), a µs
or so per node and step at course sizes. Compiled autograd calls
`rule.backward` itself and is unaffected.

The fast path leans on private torch internals (`torch._C._FunctionBase.apply`,
`torch._functorch.utils.unwrap_dead_wrappers`, `torch._C._are_functorch_transforms_active`).
Where a torch version lacks any of them, every call takes `Function.apply`: slower, same result;
`direct_backward` leaves a rule unchanged where `Function`'s backward plumbing is not as expected.
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


# Only dynamo needs `Function.apply` (it cannot trace the C++ apply); other tracers (make_fx, export)
# run the C++ apply either way, `Function.apply` only adding the signature binding. is_dynamo_compiling
# is `return False` outside dynamo (is_compiling calls torch.jit.is_scripting too: a frame per rule call).
_is_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
_Tensor = torch.Tensor


def apply_rule(rule: type[torch.autograd.Function], *args):
    """`rule.apply(*args)`, with every argument of `rule.forward` given positionally."""
    if _c_apply is None or _transforms_active() or _is_compiling():
        return rule.apply(*args)
    for arg in args:  # a wrapper left by a finished torch.func transform: unwrap all, as `apply` does
        if isinstance(arg, _Tensor) and _is_wrapped(arg):
            args = unwrap_dead_wrappers(args)
            break
    return _c_apply.__get__(None, rule)(*args)


def direct_backward(rule: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator: autograd's engine calls `rule.backward` directly (see the module docstring).

    Only for a plain rule, as `BackwardCFunction.apply` would treat it: a `backward`, no `vjp`, grads
    not boxed. Then the node's `apply(ctx, *grads)` calls `rule.backward(ctx, *grads)`, the same call.
    """
    backward_cls = rule.__dict__.get("_backward_cls")  # made by FunctionMeta for this class
    plain = (
        backward_cls is not None
        and getattr(torch.autograd.function.BackwardCFunction, "apply", None) is not None
        and rule.vjp is torch.autograd.Function.vjp
        and not getattr(rule, "boxed_grads_call", False)
    )
    if plain:

        def apply(ctx, *grads):  # rule.backward looked up at each call, so a patched backward runs too
            return rule.backward(ctx, *grads)

        backward_cls.apply = apply
    return rule
