"""scripts/bench_per_sample.py --quick: every contender that runs agrees on the norms, and the table prints."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.scripts import load_script
from tests.test_recurrent import graph_nodes


@pytest.mark.slow
def test_quick_benchmark_runs_and_contenders_agree(capsys):
    bench = load_script("bench_per_sample")
    assert bench.main(["--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for model in ("mlp", "transformer block", "cnn 2 conv 28", "cnn 2 conv5"):
        for contender in ("stock step", "ours materialize", "ours norms only", "opacus hooks", "torch.func vmap(grad)",
                          "ours DP-SGD", "opacus DP-SGD"):
            assert any(line.startswith(f"| {model}") and f"| {contender} | " in line and line.split("|")[3].strip() != "n/a"
                       for line in out.splitlines()), (model, contender)


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, True)])
def test_lstm_per_sample_grads_equal_opacus_dplstm(layers, bidirectional):
    """Every parameter's (N, *p.shape) per-sample gradient, ours against Opacus's DPLSTM loaded with the
    same weights, matched by name (DPLSTM names them as torch does), in float64; and the norms only path."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    import manual_backprop

    bench = load_script("bench_per_sample")
    torch.manual_seed(0)
    stock = bench.Recurrent(6).double()
    stock.lstm = torch.nn.LSTM(6, 6, num_layers=layers, bidirectional=bidirectional, batch_first=True).double()
    stock.head = torch.nn.Linear(6 * (1 + bidirectional), 10).double()
    x, y = torch.randn(5, 7, 6, dtype=torch.float64), torch.randint(0, 10, (5,))

    theirs = GradSampleModule(ModuleValidator.fix(copy.deepcopy(stock)).double())  # fix builds DPLSTM in float32
    assert type(theirs._module.lstm).__name__ == "DPLSTM"
    bench.loss_fn(theirs(x), y).backward()
    expected = {n: p.grad_sample for n, p in theirs._module.named_parameters()}

    ours = manual_backprop.convert(copy.deepcopy(stock))
    with manual_backprop.per_sample_grads(ours) as ps:
        out = ours(x)
        bench.loss_fn(out, y).backward()
    assert "LSTMLayerBackward" in graph_nodes(out)
    assert sorted(expected) == sorted(n for n, _ in ours.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad_sample, expected[name], msg=name)
    with manual_backprop.per_sample_grads(ours, materialize=False) as norms_only:
        bench.loss_fn(ours(x), y).backward()
    torch.testing.assert_close(norms_only.norms, ps.norms)
    torch.testing.assert_close(ps.norms, bench._norms_from_grad_samples(list(theirs._module.parameters())))


@pytest.mark.slow
def test_quick_lstm_benchmark_runs_and_opacus_agrees(capsys):
    bench = load_script("bench_per_sample")
    assert bench.main(["--quick", "--device", "cpu", "--only", "lstm"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| lstm")]
    for contender in ("ours materialize", "ours norms only", "opacus hooks"):
        assert any(f"| {contender} | " in line and line.rstrip().endswith("| yes |") for line in rows), contender
