"""Recurrent layers through Lightning's doors: the demo `SimpleLSTM`, a Trainer step, DP-SGD on an LSTM from the CLI."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning.demos import LightningLSTM, SimpleLSTM

import manual_backprop as mb
import manual_backprop.nn as mnn
from lightning_modules import MulticlassClassificationTask, SequenceClassifier, config_path
from lightning_modules.cli import build_cli

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["manual-backprop"])  # LightningCLI reads sys.argv too


def test_simple_lstm_demo_runs_entirely_on_our_rules():
    """Lightning's own demo model, at its default sizes: every parameter on our rules after convert."""
    demo = SimpleLSTM()
    before = mb.report(demo)
    assert before.stock_parameters > 0
    report = mb.report(mb.convert(demo))
    assert report.stock_parameters == 0 and report.manual_parameters == sum(p.numel() for p in demo.parameters())
    assert "100.0% of parameters on manual rules" in report.summary()


def test_simple_lstm_demo_trains_like_stock_in_float64():
    """A small SimpleLSTM in training mode (dropout in and between the LSTM's layers), seeded alike:
    the same loss and every gradient as stock, through the demo's own forward and init_hidden."""
    torch.manual_seed(0)
    stock = SimpleLSTM(vocab_size=40, ninp=8, nhid=6, nlayers=3, dropout=0.3).double()
    ours = mb.convert(stock)
    tokens, target = torch.randint(0, 40, (4, 7)), torch.randint(0, 40, (4, 7))
    results = []
    for model in (stock, ours):
        torch.manual_seed(1)
        hidden = model.init_hidden(4)
        output, (h, c) = model(tokens, hidden)
        loss = F.nll_loss(output, target.view(-1)) + h.square().sum() + c.sum()
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (l_stock, g_stock), (l_ours, g_ours) = results
    torch.testing.assert_close(l_ours, l_stock, rtol=1e-12, atol=0)
    for (name, _), a, b in zip(stock.named_parameters(), g_ours, g_stock):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")
    assert type(ours.rnn) is mnn.LSTM


def test_lightning_lstm_training_step_runs_our_rule():
    """The demo LightningModule's own training_step (its hidden state carried across batches), converted."""
    torch.manual_seed(0)
    module = LightningLSTM(vocab_size=30)
    module.model = mb.convert(SimpleLSTM(vocab_size=30, ninp=8, nhid=8, nlayers=2))
    module.log = lambda *args, **kwargs: None  # no Trainer attached
    batch = (torch.randint(0, 30, (3, 5)), torch.randint(0, 30, (3, 5)))
    loss = module.training_step(batch, 0)
    nodes, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            nodes.add(type(node).__name__)
            stack.extend(f for f, _ in node.next_functions)
    assert {"LSTMLayerBackward", "EmbeddingBackward", "LinearBackward"} <= nodes
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())
    module.training_step(batch, 1).backward()  # the carried state is detached, as in the demo


@pytest.mark.parametrize("cell", SequenceClassifier.CELLS)
def test_sequence_classifier_runs_on_our_rules(cell):
    net = SequenceClassifier(input_size=8, hidden_size=5, num_classes=3, cell=cell, bidirectional=True)
    assert net(torch.randn(2, 8, 8)).shape == (2, 3)
    assert mb.report(mb.convert(net)).stock_parameters == 0


def test_dp_sgd_on_an_lstm_from_the_cli(tmp_path):
    """The shipped config trains an LSTM with DP-SGD: per-sample norms through time, clipping, noise, ε."""
    args = ["fit", "--config", str(config_path("multiclass_digits_lstm_dp")), "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.net.init_args.hidden_size=8", *QUIET]
    cli = build_cli(args)
    assert type(cli.model) is MulticlassClassificationTask and type(cli.model.net.rnn) is mnn.LSTM
    assert cli.trainer.global_step == 3
    epsilon = cli.trainer.callback_metrics["train/epsilon"]
    assert torch.isfinite(epsilon) and epsilon > 0
