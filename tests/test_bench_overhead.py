"""scripts/bench_overhead.py: its contenders compute stock's gradients, and a run prints every line; not its timing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_overhead")


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu"])
def test_floor_and_per_layer_give_stocks_gradients(bench, name):
    stock_activation, our_activation = bench._ACTIVATIONS[name]
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Linear(4, 8), stock_activation(), nn.Linear(8, 1))
    floor = nn.Sequential(bench._FloorLinear(4, 8), bench._FloorActivation(name), bench._FloorLinear(8, 1))
    ours = nn.Sequential(bench.mnn.Linear(4, 8), our_activation(), bench.mnn.Linear(8, 1))
    x = torch.randn(5, 4, requires_grad=True)
    expected = None
    for model in (stock, floor, ours):
        model.load_state_dict(stock.state_dict())
        grads = torch.autograd.grad(model(x).square().sum(), [x, *model.parameters()])
        if expected is None:
            expected = grads
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want)


def test_a_run_prints_step_and_forward_per_activation(bench, capsys):
    bench.main(["--rounds", "1", "--activation", "tanh", "relu", "--floor"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["tanh step", "tanh forward", "relu step", "relu forward"]
    assert all("per-layer ÷ stock" in line and "floor ÷ stock" in line for line in lines)
