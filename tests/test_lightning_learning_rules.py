"""Lightning tasks and the CLI train with any learning rule: `learning_rule="sign_symmetry"`, ..."""

from __future__ import annotations

import sys

import pytest
import torch

import manual_backprop as mb
from lightning_modules import MulticlassClassificationTask, RegressionTask, SmallCNN, config_path
from lightning_modules.cli import build_cli
from lightning_modules.errors import ConfigError
from manual_backprop.plugins import direct_feedback_alignment as dfa
from manual_backprop.plugins import feedback_alignment as fa
from tests.test_lightning_cli import QUIET, run_cli


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["manual-backprop"])


def test_cli_trains_with_a_learning_rule_and_its_checkpoint_reloads(tmp_path):
    args = ["fit", "--config", str(config_path("multiclass_digits")), "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
            "--model.init_args.learning_rule=fixed_random_sign_symmetry", f"--trainer.default_root_dir={tmp_path}"]
    cli = build_cli(args + QUIET)
    net = cli.model.net
    assert type(net) is fa.FixedRandomSignSymmetryMLP and cli.model.hparams["learning_rule"] == "fixed_random_sign_symmetry"
    assert all("feedback" in layer._buffers for layer in net.layers)
    checkpoint = cli.trainer.checkpoint_callback.best_model_path
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert not any("feedback" in key for key in saved) and "net.layers.0.weight" in saved  # stock keys only
    reloaded = MulticlassClassificationTask.load_from_checkpoint(checkpoint, weights_only=True)
    assert type(reloaded.net) is fa.FixedRandomSignSymmetryMLP  # the rule is a hyperparameter
    for p, q in zip(reloaded.net.parameters(), net.parameters()):
        torch.testing.assert_close(p, q)


def test_unknown_rule_is_a_one_line_cli_error(tmp_path, capsys):
    args = ["fit", "--config", str(config_path("multiclass_digits")), "--trainer.fast_dev_run=true",
            "--model.init_args.learning_rule=hebbian", f"--trainer.default_root_dir={tmp_path}", *QUIET]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.startswith(
        "manual-backprop: error: unknown learning_rule 'hebbian'; choose one of: backprop, "), err
    assert "direct_feedback_alignment" in err and "sign_symmetry" in err


def test_tasks_convert_their_network_with_the_rule():
    task = RegressionTask(in_features=3, hidden_sizes=[4], learning_rule="direct_feedback_alignment")
    assert type(task.net) is dfa.MLP and task.net.layers[0].feedback.shape == (1, 4)
    x = torch.randn(5, 3)
    task.loss_fn(task(x), torch.randn(5, 1)).backward()
    assert all(p.grad is not None for p in task.parameters())
    cnn = MulticlassClassificationTask(num_classes=10, net=SmallCNN(channels=[2, 4]), learning_rule="sign_symmetry")
    assert [type(m) for m in cnn.net if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))] == [
        fa.SignSymmetryConv2d, fa.SignSymmetryConv2d, fa.SignSymmetryLinear]
    with pytest.raises(ConfigError, match="needs backend 'manual'"):
        MulticlassClassificationTask(in_features=3, num_classes=2, backend="autograd", learning_rule="feedback_alignment")
    assert "backprop" in mb.learning_rule_names()
