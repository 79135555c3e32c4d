"""The `manual-backprop` CLI driven in-process with `args=`, the console script once, and `make train`'s script."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import manual_backprop.nn as mnn
from lightning_modules import (
    CONFIG_DIR,
    BinaryClassificationTask,
    CSVDataModule,
    MulticlassClassificationTask,
    RegressionTask,
    SklearnDataModule,
    config_path,
)
from lightning_modules.cli import build_cli, cli_main

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]

# shipped config, model class, data module class, linked init args the model must have received
SHIPPED = [
    ("regression_diabetes", RegressionTask, SklearnDataModule, {"in_features": 10, "out_features": 1}),
    ("binary_breast_cancer", BinaryClassificationTask, SklearnDataModule, {"in_features": 30}),
    ("multiclass_digits", MulticlassClassificationTask, SklearnDataModule, {"in_features": 64, "num_classes": 10}),
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    # LightningCLI warns when both args= and sys.argv carry arguments; under pytest sys.argv is pytest's.
    monkeypatch.setattr(sys, "argv", ["manual-backprop"])


def test_every_shipped_config_is_tested_here():
    others = ["csv_example", "multiclass_digits_cnn"]  # the CNN config: tests/test_lightning_cnn.py
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted([s[0] for s in SHIPPED] + others)
    with pytest.raises(FileNotFoundError, match="no shipped config 'nope'; the shipped configs are: binary_breast"):
        config_path("nope")


@pytest.mark.parametrize("config, model_cls, data_cls, linked", SHIPPED, ids=[s[0] for s in SHIPPED])
def test_shipped_config_fits_with_fast_dev_run_and_links_data_shapes(tmp_path, config, model_cls, data_cls, linked):
    args = ["fit", "--config", str(config_path(config)), "--trainer.fast_dev_run=true"]
    cli = build_cli(args + QUIET + [f"--trainer.default_root_dir={tmp_path}"])
    assert type(cli.model) is model_cls and type(cli.datamodule) is data_cls
    assert cli.model.hparams["backend"] == "manual"
    for key, value in linked.items():
        assert cli.model.hparams[key] == value
    assert type(cli.model.net) is mnn.MLP
    assert cli.trainer.global_step == 1
    # hparams hold only the model's own arguments: no link the model does not take.
    assert set(cli.model.hparams) - {"_class_path", "_instantiator"} <= set(
        model_cls.__init__.__code__.co_varnames[1 : model_cls.__init__.__code__.co_argcount]
    )


def test_print_config_prints_the_resolved_config_and_exits(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config_path("multiclass_digits")), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lightning_modules.MulticlassClassificationTask"
    assert printed["model"]["init_args"]["hidden_sizes"] == [64]
    assert printed["data"]["init_args"]["dataset"] == "digits"
    assert printed["seed_everything"] == 42
    assert printed["curves"]["filename"] == "training_curves.png"


def test_backend_switch_and_optimizer_section_from_the_command_line(tmp_path):
    args = [
        "fit", "--config", str(config_path("binary_breast_cancer")), "--trainer.fast_dev_run=true",
        "--model.init_args.backend=autograd", "--optimizer=SGD", "--optimizer.lr=0.05",
        "--lr_scheduler=StepLR", "--lr_scheduler.step_size=1", "--lr_scheduler.gamma=0.5",
        f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip
    cli = build_cli(args + QUIET)
    assert type(cli.model.net) is torch.nn.Sequential and type(cli.model.net[0]) is torch.nn.Linear
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["initial_lr"] == 0.05
    (scheduler,) = cli.trainer.lr_scheduler_configs
    assert type(scheduler.scheduler) is torch.optim.lr_scheduler.StepLR
    assert optimizer.param_groups[0]["lr"] == 0.025  # one epoch (fast_dev_run) stepped it once


def test_bf16_mixed_from_the_command_line_trains_on_our_rules(tmp_path):
    args = [
        "fit", "--config", str(config_path("regression_diabetes")), "--trainer.max_steps=3",
        "--trainer.precision=bf16-mixed", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip
    cli = build_cli(args + QUIET)
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step == 3
    x, y = next(iter(cli.datamodule.train_dataloader()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cli.model.loss_fn(*cli.model.loss_inputs(cli.model(x), y))
    assert type(loss.grad_fn).__name__ == "MSELossBackward" and torch.isfinite(loss)
    cast = loss.grad_fn.next_functions[0][0]
    assert type(cast).__name__ == "ToCopyBackward0"  # bf16 output cast up for the loss
    assert type(cast.next_functions[0][0]).__name__ == "MLPBackward"  # the network: our fused rule, in bf16
    assert torch.isfinite(torch.as_tensor(float(cli.trainer.callback_metrics["train/loss_epoch"])))


def write_csv(path: Path, rows: int = 80) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 3))
    y = x @ np.array([1.5, -2.0, 0.5]) + 0.1 * rng.normal(size=rows)
    lines = ["x1,x2,x3,price"] + [",".join(f"{v:.6f}" for v in (*row, target)) for row, target in zip(x, y)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_config_fits_then_test_and_predict_subcommands_use_the_checkpoint(tmp_path):
    csv_path = write_csv(tmp_path / "houses.csv")
    common = [
        "--config", str(config_path("csv_example")),
        f"--data.init_args.path={csv_path}", "--data.init_args.target_columns=[price]",
        f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip
    fit = build_cli(["fit", *common, "--trainer.max_epochs=3", *QUIET])
    assert type(fit.datamodule) is CSVDataModule and fit.model.hparams["in_features"] == 3
    log_dir = Path(fit.trainer.log_dir)
    assert (log_dir / "metrics.csv").is_file() and (log_dir / "config.yaml").is_file()
    assert (log_dir / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    (checkpoint,) = (log_dir / "checkpoints").glob("*.ckpt")
    assert "net" not in torch.load(checkpoint, weights_only=True)["hyper_parameters"]

    test = build_cli(["test", *common, f"--ckpt_path={checkpoint}", *QUIET])
    assert "test/r2" in test.trainer.callback_metrics
    predict = build_cli(["predict", *common, f"--ckpt_path={checkpoint}", *QUIET])
    torch.testing.assert_close(predict.model.net.layers[0].weight, fit.model.net.layers[0].weight)
    validate = build_cli(["validate", *common, f"--ckpt_path={checkpoint}", *QUIET])
    assert "val/loss" in validate.trainer.callback_metrics


@pytest.mark.parametrize("backend", ["manual", "autograd"])
def test_user_network_from_a_class_path_in_a_config(tmp_path, backend):
    config = {
        "model": {
            "class_path": "lightning_modules.BinaryClassificationTask",
            "init_args": {
                "backend": backend,
                "net": {"class_path": "torch.nn.Linear", "init_args": {"in_features": 30, "out_features": 1}},
            },
        },
        "data": {"class_path": "lightning_modules.SklearnDataModule", "init_args": {"dataset": "breast_cancer"}},
    }
    path = tmp_path / "net.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path), "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    assert type(cli.model.net) is (mnn.Linear if backend == "manual" else torch.nn.Linear)


@pytest.mark.parametrize(
    "override, error, message",
    [
        ("--data.init_args.dataset=mnist", ValueError, "unknown dataset 'mnist'; choose one of: diabetes"),
        ("--model.init_args.activation=swish", ValueError, "unknown activation 'swish'; choose one of: sigmoid"),
        ("--model.init_args.hidden_sizes=[16,-2]", ValueError, r"hidden_sizes\[1\] must be a positive integer; got -2"),
        ("--model.init_args.backend=numpy", ValueError, "backend must be one of 'manual', 'autograd'; got 'numpy'"),
    ],
)
def test_bad_input_on_the_command_line_fails_before_training(tmp_path, override, error, message):
    args = ["fit", "--config", str(config_path("multiclass_digits")), override, f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(error, match=message):
        build_cli(args + QUIET)
    assert not (tmp_path / "lightning_logs").exists()  # nothing started


def test_bad_csv_on_the_command_line_names_the_columns(tmp_path):
    csv_path = write_csv(tmp_path / "houses.csv")
    args = ["fit", "--config", str(config_path("csv_example")), f"--data.init_args.path={csv_path}"]
    with pytest.raises(ValueError, match="no column 'target'; the columns are: x1, x2, x3, price"):
        build_cli(args + QUIET)


@pytest.mark.slow
def test_console_script_runs_a_fast_dev_run(tmp_path):
    script = Path(sys.executable).parent / "manual-backprop"
    assert script.is_file(), "the console script is missing: reinstall with `pip install -e .`"
    args = [str(script), "fit", "--config", str(config_path("binary_breast_cancer")), "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}", *QUIET]  # fmt: skip
    # Run from tmp_path, not the repository: the installed package must be importable on its own.
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=1` reached." in done.stderr + done.stdout


def load_train_examples():
    spec = importlib.util.spec_from_file_location("train_examples", ROOT / "scripts" / "train_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_train_script_prints_one_table_and_fails_when_a_floor_is_missed(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        # One epoch: diabetes' R² is still far below its floor of 0.30.
        code = load_train_examples().main(["--max_epochs", "1", "--root", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["task", "main", "test"] and set(lines[1]) <= {"-", " "}
    assert [line.split()[0] for line in lines[2:5]] == ["regression_diabetes", "binary_breast_cancer", "multiclass_digits"]
    assert code == 1 and "FLOOR MISSED: regression_diabetes: test r2 = " in err
    assert (tmp_path / "multiclass_digits" / "lightning_logs" / "version_0" / "training_curves.png").is_file()
