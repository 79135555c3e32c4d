"""Differentially private SGD on our per-sample norms: clip each sample, add Gaussian noise, average.

The DP-SGD step (Abadi et al., 2016), with gₙ sample n's gradient and C the clipping norm:

    cₙ = min(1, C / (‖gₙ‖ + 1e-6))                 each sample's clip factor, from `ps.norms`
    g̃ = (Σₙ cₙ gₙ + 𝒩(0, σ²C² I)) / B              noise σC, averaged over the (expected) batch size B

Σₙ cₙ gₙ needs no per-sample gradient: every rule's gradient is linear in δ, so it is the rule's
own summed gradient of the reweighted δ, Σₙ (cₙ δₙ) aₙᵀ (the "reweighted outer-product sum";
`per_sample_grads.weighted_sum`). With materialize=True the (N, *p.shape) `grad_sample`s are
weighted instead, as Opacus does.

Book-keeping: backward need not form the unclipped Σₙ gₙ that this step overwrites. Under
`per_sample_grads(model, materialize=False, bookkeeping=True)` the rules skip their parameter
gradients, keep δ and a (their norms come from them), and `clip_and_noise_` forms each rule's
clipped sum once: a private step costs about one ordinary backward, plus the norms and the noise.
`.grad` is then written only here; without book-keeping (the default) backward accumulates the
unclipped gradient into `.grad` as usual, for readers who do not clip.

Under torch.distributed (DDP: `distributed=True`) every process clips its own samples, and the step is
the one a single process would take on the global batch (Opacus's `DistributedDPOptimizer` does the same):

    g̃ = (Σₖ Σ_{n on process k} cₙ gₙ + 𝒩(0, σ²C² I)) / Σₖ Nₖ        Nₖ: process k's samples

The noise is drawn once, on rank 0, and added to rank 0's clipped sum before the sum over processes, so it
travels with that one all-reduce and every process ends with the same gradient.

The privacy spent is counted by Opacus's accountants (`accountant`), imported only when asked
for: the package imports and trains without Opacus.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from manual_backprop._checks import InputError
from manual_backprop.per_sample import per_sample_grads

__all__ = ["accountant", "clip_and_noise_", "clip_factors", "noise_only_", "skip_gradient_sync"]


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """cₙ = min(1, C / (‖gₙ‖ + 1e-6)): Opacus's per-sample clip factor."""
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


def clip_and_noise_(ps: per_sample_grads, max_grad_norm: float, noise_multiplier: float,
                    generator: torch.Generator | None = None, batch_size: int | None = None,
                    distributed: bool = False) -> torch.Tensor:
    """Replace each parameter's `.grad` by its DP-SGD gradient (Σₙ cₙ gₙ + 𝒩(0, (σC)²)) / B, in place.

    ps:               a `per_sample_grads` context after its backward (either materialize setting; with
                      `bookkeeping=True` its backward left `.grad` alone and this writes it).
    max_grad_norm:    C, the per-sample clipping norm.
    noise_multiplier: σ; the noise's standard deviation is σC (0: clipping only).
    generator:        for the noise (torch's global RNG if None; under `distributed`, rank 0's).
    batch_size:       B, the expected batch size under Poisson sampling (default: the samples seen; under
                      `distributed`, the global batch: the samples seen by all processes together).
    distributed:      every process of the default torch.distributed group calls this in the same step
                      (DDP): Σₙ cₙ gₙ is summed over the processes, the noise drawn once (on rank 0) and
                      B is the global batch, so every process gets the same `.grad`. The `.grad`s found
                      are ignored (DDP's average of unclipped gradients): skip DDP's own all-reduce with
                      `skip_gradient_sync` rather than pay for it, and use book-keeping, so that no unclipped
                      gradient is formed at all (DDP's reducer does not wait for one: a rule that returns
                      none still fires the parameter's hook, and the reducer fills that `.grad` with zeros,
                      which this replaces). Only the clipped sums cross the processes. Every process must
                      privatise the same parameters (as DDP requires).

    Returns the clip factors cₙ (this process's samples). Parameters on stock autograd (`ps.skipped`) cannot
    be privatised: error.
    """
    if max_grad_norm <= 0 or noise_multiplier < 0:
        raise InputError(f"clip_and_noise_: need max_grad_norm > 0 and noise_multiplier >= 0, got "
                         f"{max_grad_norm} and {noise_multiplier}")
    if ps.skipped:
        raise InputError(f"clip_and_noise_: these parameters have no per-sample gradients, so no private update: "
                         f"{', '.join(ps.skipped)}")
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise InputError("clip_and_noise_: distributed=True needs an initialized torch.distributed process group")
    norms = ps.norms
    factors = clip_factors(norms, max_grad_norm)
    sums = ps.weighted_sum(factors)
    params = ps.parameters()  # the model's order, so a seeded generator draws the same noise as Opacus
    _noisy_mean_(params, [sums[p] for p in params], max_grad_norm, noise_multiplier, generator,
                 norms.shape[0] if batch_size is None else batch_size, batch_size is None, distributed, norms.device)
    return factors


def noise_only_(params: list[torch.Tensor], max_grad_norm: float, noise_multiplier: float, batch_size: float,
                generator: torch.Generator | None = None, distributed: bool = False) -> None:
    """The DP-SGD step of an empty batch, which Poisson sampling may draw: `.grad` = 𝒩(0, (σC)²) / B.

    The step is still taken (as Opacus takes it): skipping it would tell which batches were empty. Under
    `distributed` this process's clipped sum is zero and it joins the other processes' all-reduce (a process
    whose batch is not empty calls `clip_and_noise_` in the same step, with the same `batch_size`)."""
    if max_grad_norm <= 0 or noise_multiplier < 0 or batch_size <= 0:
        raise InputError(f"noise_only_: need max_grad_norm > 0, noise_multiplier >= 0 and batch_size > 0, got "
                         f"{max_grad_norm}, {noise_multiplier} and {batch_size}")
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise InputError("noise_only_: distributed=True needs an initialized torch.distributed process group")
    params = list(params)
    device = params[0].device if params else torch.device("cpu")
    _noisy_mean_(params, [torch.zeros_like(p) for p in params], max_grad_norm, noise_multiplier, generator,
                 batch_size, False, distributed, device)


def _noisy_mean_(params, sums, max_grad_norm, noise_multiplier, generator, B, count_globally, distributed, device):
    """p.grad = (Σₙ cₙ gₙ + 𝒩(0, (σC)²)) / B for each p; under `distributed` the sums (and, with
    `count_globally`, B) are summed over the processes and the noise is drawn on rank 0 only.

    The sums are fresh tensors of ours (`weighted_sum`'s): the noise is added and B divided out in place, the
    same arithmetic as (sum + noise) / B without two more parameter-sized tensors per step."""
    noisy = noise_multiplier > 0 and (not distributed or dist.get_rank() == 0)  # once per step, not per process
    totals = []
    for p, total in zip(params, sums):
        if noisy:
            noise = torch.normal(0.0, noise_multiplier * max_grad_norm, p.shape, generator=generator,
                                 device=p.device, dtype=p.dtype)
            total = total.add_(noise) if total.dtype == p.dtype and total.shape == p.shape else total + noise
        totals.append(total)
    if distributed:
        _all_reduce_sum_(totals)
        if count_globally:
            B = _global_count(B, device)
    for p, total in zip(params, totals):
        p.grad = total.div_(B) if total.is_floating_point() else total / B


def _all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the processes, in place: one all-reduce per dtype (of all its tensors, flattened)."""
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for t, summed in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(summed.view_as(t))


def _global_count(count: int, device: torch.device) -> torch.Tensor:
    """Σ over the processes of each one's sample count: the global batch (the processes' batches may differ).
    A tensor on `device`, so that dividing by it waits on no host sync."""
    total = torch.tensor(count, dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def skip_gradient_sync(ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
    """Make DDP's backward leave each process's gradients local (torch's `noop_hook` as its communication
    hook): under DP-SGD `clip_and_noise_(..., distributed=True)` sums the clipped gradients itself, so
    DDP's all-reduce of the unclipped ones would be thrown away. Call once, before the first backward; a
    DDP model that already has a communication hook raises torch's RuntimeError."""
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

    ddp_model.register_comm_hook(None, noop_hook)


def accountant(mechanism: str = "prv"):
    """Opacus's privacy accountant ("prv", "rdp" or "gdp"): `.step(noise_multiplier=σ, sample_rate=q)` per
    step, `.get_epsilon(delta)` for ε. Needs Opacus (pip install 'manual-backprop[privacy]')."""
    try:
        from opacus.accountants import create_accountant
    except ImportError as error:
        raise ImportError(
            "manual_backprop.privacy.accountant needs Opacus for privacy accounting: pip install opacus "
            "(or 'manual-backprop[privacy]'); clipping and noise (clip_and_noise_) work without it"
        ) from error
    return create_accountant(mechanism=mechanism)
