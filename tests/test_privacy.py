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
from tests.test_per_sample import CASES, F64, Case, _models, _xy, reference

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


# ------------------------------------------------------------------ book-keeping: no unclipped gradient formed


class Recurrent(nn.Module):
    """An LSTM (with a projection) and a GRU over (N, T, ·), a linear head on the last step."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True, proj_size=4)
        self.gru = nn.GRU(4, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gru(self.lstm(x)[0])[0][:, -1])


BOOKKEEPING_CASES = [*CASES, Case("lstm_gru", Recurrent, _xy((4, 6, 3), (4, 2)))]


@pytest.mark.parametrize("sigma", [0.0, 0.8], ids=["clip_only", "seeded_noise"])
@pytest.mark.parametrize("case", BOOKKEEPING_CASES, ids=repr)
def test_bookkeeping_step_equals_the_materialising_step(case, sigma):
    """Book-keeping (backward forms no unclipped gradient; Σₙ cₙ gₙ is each rule's summed gradient of cₙδₙ)
    gives the gradient that clipping the materialised per-sample gradients gives, noise included."""
    _, materialising = _models(case)
    bookkeeping = copy.deepcopy(materialising)
    x, y = case.inputs(torch.Generator().manual_seed(1))
    reduction = "sum" if case.loss.__name__ == "mse_sum" else "mean"
    grads, clipped = {}, {}
    for model, kwargs in ((materialising, {}), (bookkeeping, dict(materialize=False, bookkeeping=True))):
        with manual_backprop.per_sample_grads(model, loss_reduction=reduction, batch_first=case.batch_first,
                                              **kwargs) as ps:
            case.loss(model(x), y).backward()
        grads[model] = {n for n, p in model.named_parameters() if p.grad is not None}
        C = float(ps.norms.min() + ps.norms.max()) / 2
        factors = privacy.clip_and_noise_(ps, C, sigma, generator=torch.Generator().manual_seed(2))
        clipped[model] = factors
    assert (clipped[materialising] < 1).any() or case.name == "linear_batch_1"  # clipping happened
    torch.testing.assert_close(clipped[bookkeeping], clipped[materialising], rtol=1e-12, atol=0)
    # the unclipped gradient was not formed: backward left every `.grad` alone (normalisation's γ, β too)
    assert grads[bookkeeping] == set()
    assert grads[materialising] == {n for n, p in materialising.named_parameters() if p.requires_grad}
    for (name, p), q in zip(materialising.named_parameters(), bookkeeping.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-15, msg=lambda m: f"{name}: {m}")


def test_bookkeeping_forms_no_weight_gradient_in_backward(monkeypatch):
    """Counted: under book-keeping, backward calls no weight-gradient product; `clip_and_noise_` calls one per
    layer (the clipped sum), and nothing is formed for a reader of `.grad` before it."""
    from manual_backprop.rules import linear

    calls = []
    product = linear.weight_and_bias_grads
    monkeypatch.setattr(linear, "weight_and_bias_grads",
                        lambda delta, a, need_W, need_b: calls.append(need_W) or product(delta, a, need_W, need_b))
    model = manual_backprop.convert(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    with manual_backprop.per_sample_grads(model, materialize=False, bookkeeping=True) as ps:
        nn.functional.cross_entropy(model(x), y).backward()
    assert calls.count(True) == 0 and all(p.grad is None for p in model.parameters())
    privacy.clip_and_noise_(ps, 1.0, 0.0)
    assert calls.count(True) == 2 and all(p.grad is not None for p in model.parameters())


def test_bookkeeping_needs_materialize_false():
    with pytest.raises(manual_backprop.InputError, match="materialize=False"):
        manual_backprop.per_sample_grads(nn.Linear(2, 2), bookkeeping=True)
