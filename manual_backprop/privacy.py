"""Differentially private SGD on our per-sample norms: clip each sample, add Gaussian noise, average.

The DP-SGD step (Abadi et al., 2016), with gₙ sample n's gradient and C the clipping norm:

    cₙ = min(1, C / (‖gₙ‖ + 1e-6))                 each sample's clip factor, from `ps.norms`
    g̃ = (Σₙ cₙ gₙ + 𝒩(0, σ²C² I)) / B              noise σC, averaged over the (expected) batch size B

Σₙ cₙ gₙ needs no per-sample gradient: every rule's gradient is linear in δ, so it is the rule's
own summed gradient of the reweighted δ, Σₙ (cₙ δₙ) aₙᵀ (the "reweighted outer-product sum";
`per_sample_grads.weighted_sum`). With materialize=True the (N, *p.shape) `grad_sample`s are
weighted instead, as Opacus does.

The privacy spent is counted by Opacus's accountants (`accountant`), imported only when asked
for: the package imports and trains without Opacus.
"""

from __future__ import annotations

import torch

from manual_backprop._checks import InputError
from manual_backprop.per_sample import per_sample_grads

__all__ = ["accountant", "clip_and_noise_", "clip_factors"]


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """cₙ = min(1, C / (‖gₙ‖ + 1e-6)): Opacus's per-sample clip factor."""
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


def clip_and_noise_(ps: per_sample_grads, max_grad_norm: float, noise_multiplier: float,
                    generator: torch.Generator | None = None, batch_size: int | None = None) -> torch.Tensor:
    """Replace each parameter's `.grad` by its DP-SGD gradient (Σₙ cₙ gₙ + 𝒩(0, (σC)²)) / B, in place.

    ps:               a `per_sample_grads` context after its backward (either materialize setting).
    max_grad_norm:    C, the per-sample clipping norm.
    noise_multiplier: σ; the noise's standard deviation is σC (0: clipping only).
    generator:        for the noise (torch's global RNG if None).
    batch_size:       B, the expected batch size under Poisson sampling (default: the samples seen).

    Returns the clip factors cₙ. Parameters on stock autograd (`ps.skipped`) cannot be privatised: error.
    """
    if max_grad_norm <= 0 or noise_multiplier < 0:
        raise InputError(f"clip_and_noise_: need max_grad_norm > 0 and noise_multiplier >= 0, got "
                         f"{max_grad_norm} and {noise_multiplier}")
    if ps.skipped:
        raise InputError(f"clip_and_noise_: these parameters have no per-sample gradients, so no private update: "
                         f"{', '.join(ps.skipped)}")
    norms = ps.norms
    factors = clip_factors(norms, max_grad_norm)
    B = norms.shape[0] if batch_size is None else batch_size
    sums = ps.weighted_sum(factors)
    for p in ps.parameters():  # the model's order, so a seeded generator draws the same noise as Opacus
        total = sums[p]
        if noise_multiplier > 0:
            noise = torch.normal(0.0, noise_multiplier * max_grad_norm, p.shape, generator=generator,
                                 device=p.device, dtype=p.dtype)
            total = total + noise
        p.grad = total / B
    return factors


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
