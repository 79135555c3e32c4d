"""DP-SGD on our per-sample norms (issue 10): clipping without per-sample gradients equals clipping with them,
Opacus's DPOptimizer takes our grad_sample unchanged, accounting comes from Opacus and is optional."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import manual_backprop
from manual_backprop import privacy
from tests.test_per_sample import CASES, F64, _models, reference

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def _clipped_mean(expected: dict, C: float) -> dict:
    norms = torch.stack([g.flatten(1).square().sum(1) for g in expected.values()]).sum(0).sqrt()
    c = (C / (norms + 1e-6)).clamp(max=1.0)
    return {name: torch.tensordot(c, g, dims=1) / g.shape[0] for name, g in expected.items()}


@pytest.mark.parametrize("materialize", [True, False], ids=["materialize", "reweighted_sum"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("linear_sequence", "tied", "cnn", "block")], ids=repr)
def test_clipping_matches_clipped_per_sample_gradients(case, materialize):
    stock, model = _models(case)
    x, y = case.inputs(torch.Generator().manual_seed(1))
    expected = reference(stock, case.loss, x, y)
    norms = torch.stack([g.flatten(1).square().sum(1) for g in expected.values()]).sum(0).sqrt()
    C = float(norms.min() + norms.max()) / 2
    with manual_backprop.per_sample_grads(model, materialize=materialize) as ps:
        case.loss(model(x), y).backward()
    factors = privacy.clip_and_noise_(ps, max_grad_norm=C, noise_multiplier=0.0)
    assert (factors < 1).any() and (factors == 1).any()  # some samples clipped, some not
    params = dict(model.named_parameters())
    for name, g in _clipped_mean(expected, C).items():
        torch.testing.assert_close(params[name].grad, g, **F64)


def test_noise_has_std_sigma_c_over_batch():
    torch.manual_seed(0)
    model = manual_backprop.nn.Linear(100, 100, bias=False)
    with manual_backprop.per_sample_grads(model, materialize=False) as ps:
        (model(torch.zeros(4, 100)).sum() * 0).backward()
    privacy.clip_and_noise_(ps, max_grad_norm=2.0, noise_multiplier=1.5, generator=torch.Generator().manual_seed(0))
    assert model.weight.grad.std().item() == pytest.approx(1.5 * 2.0 / 4, rel=0.05)


@pytest.mark.parametrize("materialize", [True, False])
def test_dp_optimizer_consumes_our_grad_sample(materialize):
    """Opacus's DPOptimizer steps on our grad_sample as on its own, noise included (same generator)."""
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    model = manual_backprop.convert(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)))
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    loss = lambda m: ((m(x) - y) ** 2).mean()  # noqa: E731

    opacus = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.7, max_grad_norm=0.3,
                         expected_batch_size=8, generator=torch.Generator().manual_seed(3))
    with manual_backprop.per_sample_grads(model) as ps:
        loss(model).backward()
    opacus.step()

    ours = torch.optim.SGD(twin.parameters(), lr=0.1)
    with manual_backprop.per_sample_grads(twin, materialize=materialize) as ps:
        loss(twin).backward()
    privacy.clip_and_noise_(ps, 0.3, 0.7, generator=torch.Generator().manual_seed(3), batch_size=8)
    ours.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_accountant_is_opacus():
    acc = privacy.accountant("rdp")
    for _ in range(10):
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
    assert 0 < acc.get_epsilon(1e-5) < 10


def test_works_without_opacus():
    code = (
        "import sys; sys.modules['opacus'] = None\n"
        "import torch, manual_backprop\n"
        "from manual_backprop import privacy\n"
        "m = manual_backprop.nn.Linear(3, 2)\n"
        "with manual_backprop.per_sample_grads(m) as ps: m(torch.randn(4, 3)).sum().backward()\n"
        "privacy.clip_and_noise_(ps, 1.0, 1.0)\n"
        "try:\n    privacy.accountant()\nexcept ImportError as e:\n    print('needs Opacus' in str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


def test_stock_parameters_cannot_be_privatised():
    model = nn.Sequential(manual_backprop.nn.Linear(3, 2), nn.Linear(2, 2))
    with manual_backprop.per_sample_grads(model, strict=False) as ps:
        model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(manual_backprop.InputError, match="1.weight"):
        privacy.clip_and_noise_(ps, 1.0, 1.0)
