"""DP-SGD on our per-sample norms: clipping without per-sample gradients equals clipping with them,
Opacus's DPOptimizer takes our grad_sample unchanged, accounting comes from Opacus and is optional."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

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


# ------------------------------------------------------------------ over several processes (DDP)


def _private_grads(x: torch.Tensor, y: torch.Tensor, distributed: bool) -> dict:
    """DP-SGD's gradient (C = 1.35: each process has samples above and below it; σ = 0.8) of a seeded float64
    network on (x, y); rank 0 and one process draw the same noise."""
    torch.manual_seed(0)
    model = manual_backprop.convert(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))).double()
    with manual_backprop.per_sample_grads(model, materialize=False) as ps:
        nn.functional.cross_entropy(model(x), y).backward()  # the mean over this process's samples
    torch.manual_seed(3)
    privacy.clip_and_noise_(ps, max_grad_norm=1.35, noise_multiplier=0.8, distributed=distributed)
    return {name: p.grad for name, p in model.named_parameters()}


def _two_processes(rank: int, root: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{root / 'rendezvous'}", rank=rank, world_size=2)
    try:
        part = slice(0, 5) if rank == 0 else slice(5, None)  # 5 and 3 samples: the processes' batches differ
        torch.save(_private_grads(x[part], y[part], distributed=True), root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_take_the_private_step_of_one_on_the_global_batch(tmp_path):
    """Each process clips its own samples; the clipped sums are summed, the noise added once (rank 0's draw)
    and the mean taken over the 8 samples of both: every process gets one process's gradient on all 8."""
    x, y = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 3
    torch.multiprocessing.spawn(_two_processes, args=(tmp_path, x, y), nprocs=2)
    one = _private_grads(x, y, distributed=False)
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, g in one.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-12, atol=1e-14)


def test_distributed_needs_a_process_group():
    model = manual_backprop.nn.Linear(3, 2)
    with manual_backprop.per_sample_grads(model) as ps:
        model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(manual_backprop.InputError, match="process group"):
        privacy.clip_and_noise_(ps, 1.0, 1.0, distributed=True)


def test_accountant_is_opacus():
    acc = privacy.accountant("rdp")
    for _ in range(10):
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
    assert 0 < acc.get_epsilon(1e-5) < 10


@pytest.mark.slow
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


@pytest.mark.parametrize("materialize", [False, True])
def test_a_finished_private_step_leaves_nothing_behind(materialize):
    """The context keeps δ and a for the reweighted sum: kept with their graph, they would tie the context
    to autograd's nodes in a cycle Python's collector cannot free, leaking every step's tensors."""
    import gc
    import weakref

    model = manual_backprop.convert(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    with manual_backprop.per_sample_grads(model, loss_reduction="sum", materialize=materialize) as ps:
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    privacy.clip_and_noise_(ps, 1.0, 1.0)
    gone = weakref.ref(ps)
    del ps
    gc.collect()
    assert gone() is None
