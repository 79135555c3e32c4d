"""The `manual-backprop` CLI driven in-process with `args=`, the console script once, and `make train`'s script."""

from __future__ import annotations

import csv
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

import manual_backprop.nn as mnn
from lightning_modules import (
    CONFIG_DIR,
    MNIST1DCNN,
    BinaryClassificationTask,
    CSVDataModule,
    MNIST1DDataModule,
    MulticlassClassificationTask,
    RegressionTask,
    SklearnDataModule,
    SmallCNN,
    TrainingCurves,
    config_path,
)
from lightning_modules.callbacks import PredictionWriter
from lightning_modules.cli import build_cli, cli_main
from tests.scripts import load_script
from tests.cases import FUSED_MLP, node_name

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]

# shipped config, model class, data module class, linked init args the model must have received
SHIPPED = [
    ("regression_diabetes", RegressionTask, SklearnDataModule, {"in_features": 10, "out_features": 1}),
    ("binary_breast_cancer", BinaryClassificationTask, SklearnDataModule, {"in_features": 30}),
    ("multiclass_digits", MulticlassClassificationTask, SklearnDataModule, {"in_features": 64, "num_classes": 10}),
    ("binary_breast_cancer_dp", BinaryClassificationTask, SklearnDataModule, {"in_features": 30}),  # DP-SGD
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    # LightningCLI warns when both args= and sys.argv carry arguments; under pytest sys.argv is pytest's.
    monkeypatch.setattr(sys, "argv", ["manual-backprop"])


def test_every_shipped_config_is_tested_here():
    others = ["csv_example", "multiclass_digits_cnn",  # the CNN config: tests/test_lightning_cnn.py
              "multiclass_digits_lstm_dp"]  # the LSTM config: tests/test_lightning_recurrent.py
    others += [f"mnist1d_{m}" for m in ("logistic", "mlp", "cnn", "gru")]  # tests/test_mnist1d.py
    others += [f"mnist_lenet_{r}" for r in ("backprop", "fa", "dfa", "usf", "brsf", "frsf")]  # tests/test_idx.py
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
    assert node_name(cast.next_functions[0][0]) in FUSED_MLP  # the network: our fused rule, in bf16
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
    checkpoint = log_dir / "checkpoints" / "last.ckpt"
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
    for noise in ("💡 Tip", "tensorboardX", "Seed set to", "LeafSpec", "logging interval"):
        assert noise not in done.stderr + done.stdout, noise


def load_train_examples():
    return load_script("train_examples")


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


# ------------------------------------------------------------------ the command as people use it

CSV_CONFIG = str(config_path("csv_example"))


def write_table(path: Path, columns: list[str], rows: int, seed: int = 0, labels=None) -> Path:
    """A numeric CSV: the last column is the target (a linear function of the others, or class `labels`)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, len(columns) - 1))
    if labels is None:
        y = x @ np.linspace(1.0, -1.0, x.shape[1]) * 10 + 50
    else:  # the class follows the first feature, so it can be learned
        y = np.asarray(labels)[np.digitize(x[:, 0], np.quantile(x[:, 0], np.linspace(0, 1, len(labels) + 1)[1:-1]))]
    lines = [",".join(columns)] + [",".join(f"{v:.6g}" for v in (*a, b)) for a, b in zip(x, y)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """cli_main in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    path = list(sys.path)  # cli_main puts the current folder on it, as a console script run there would
    try:
        cli_main(args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        sys.path[:] = path
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def two_target_run(tmp_path_factory):
    """One 2-epoch fit of the CSV config on a CSV with two targets in different units; shared by the
    resume, test and predict tests below (a Lightning fit is the slow part)."""
    root = tmp_path_factory.mktemp("two_targets")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 3))
    price, rooms = x @ [30.0, -20.0, 5.0] + 300, x @ [0.5, 0.2, -0.1] + 4
    table = root / "houses.csv"
    table.write_text("size,age,dist,price,rooms\n" + "\n".join(",".join(f"{v:.6g}" for v in (*a, p, r)) for a, p, r in zip(x, price, rooms)) + "\n")
    common = [
        "--config", CSV_CONFIG, f"--data.init_args.path={table}", "--data.init_args.target_columns=[price,rooms]",
        f"--trainer.default_root_dir={root}", *QUIET,
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["manual-backprop"])
        fit = build_cli(["fit", *common, "--trainer.max_epochs=2"])
    return {"root": root, "table": table, "common": common, "fit": fit, "log_dir": Path(fit.trainer.log_dir)}


def test_shipped_configs_save_last_ckpt():
    for path in CONFIG_DIR.glob("*.yaml"):
        (callback,) = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
        assert callback["class_path"] == "pytorch_lightning.callbacks.ModelCheckpoint", path
        assert callback["init_args"]["save_last"] is True, path


def test_per_target_metrics_and_named_averages(two_target_run):
    fit = two_target_run["fit"]
    assert fit.model.hparams["target_names"] == ["price", "rooms"]  # linked from the CSV's columns
    metrics = fit.trainer.callback_metrics
    for name in ("mse", "mae", "r2"):
        per_target = [float(metrics[f"val/{name}/{column}"]) for column in ("price", "rooms")]
        assert float(metrics[f"val/{name}"]) == pytest.approx(sum(per_target) / 2, rel=1e-5)
    assert float(metrics["val/mae/price"]) > 10 * float(metrics["val/mae/rooms"])  # the units differ: hence both


def test_curves_say_what_they_plot(two_target_run):
    fit = two_target_run["fit"]
    assert TrainingCurves._title(fit.trainer, fit.model) == f"RegressionTask: MLP 3→32→32→2 (tanh) on {two_target_run['table']}\nbackend manual"
    assert TrainingCurves._metric_label(fit.model, "r2") == "R² (mean over 2 targets)"
    single = RegressionTask(3)
    assert [TrainingCurves._metric_label(single, m) for m in ("r2", "mae")] == ["R²", "MAE (target units)"]
    binary = BinaryClassificationTask(3)
    assert (binary.loss_label, TrainingCurves._metric_label(binary, "accuracy")) == ("loss: binary cross-entropy", "accuracy")
    assert fit.model.loss_label == "loss: MSE on standardized targets"
    assert (two_target_run["log_dir"] / "training_curves.png").stat().st_size > 10_000



class _Unnamed(pl.LightningDataModule):  # a user's data module: no describe_source, no repr of its own
    pass


class _Named(pl.LightningDataModule):
    def __repr__(self) -> str:
        return "Named('shop.csv')"


# task, data module, callback_metrics, title
TITLES = [
    (lambda: RegressionTask(10, hidden_sizes=[16]), lambda: SklearnDataModule("diabetes"), {},
     "RegressionTask: MLP 10→16→1 (relu) on scikit-learn's diabetes data\nbackend manual"),
    (lambda: BinaryClassificationTask(30, hidden_sizes=[32], activation="relu", dp_noise_multiplier=1.5),
     lambda: SklearnDataModule("breast_cancer"), {"train/epsilon": torch.tensor(4.6234)},
     "BinaryClassificationTask: MLP 30→32→1 (relu) on scikit-learn's breast_cancer data\n"
     "backend manual, DP-SGD σ=1.5, ε=4.62 (δ=1e-05)"),
    (lambda: BinaryClassificationTask(30, hidden_sizes=[], activation="tanh", dp_noise_multiplier=0.0, dp_delta=1e-6),
     lambda: SklearnDataModule("breast_cancer"), {"train/epsilon": torch.tensor(float("inf"))},
     "BinaryClassificationTask: MLP 30→1 (tanh) on scikit-learn's breast_cancer data\n"
     "backend manual, DP-SGD σ=0, ε=∞ (δ=1e-06)"),
    (lambda: MulticlassClassificationTask(64, 10, learning_rule="feedback_alignment"), lambda: SklearnDataModule("digits"), {},
     "MulticlassClassificationTask: MLP 64→64→10 (relu) on scikit-learn's digits data\n"
     "backend manual, learning rule feedback_alignment"),
    (lambda: MulticlassClassificationTask(num_classes=10, net=SmallCNN(image_size=8)), lambda: SklearnDataModule("digits", image_shape=[1, 8, 8]), {},
     "MulticlassClassificationTask: SmallCNN on scikit-learn's digits data\nbackend manual"),
    (lambda: MulticlassClassificationTask(num_classes=10, net=MNIST1DCNN(), backend="autograd"), lambda: MNIST1DDataModule(shape=[1, 40]), {},
     "MulticlassClassificationTask: MNIST1DCNN on MNIST-1D\nbackend autograd"),
    (lambda: RegressionTask(3, 2, hidden_sizes=[4, 5], activation="tanh", backend="autograd"), _Named, {},
     "RegressionTask: MLP 3→4→5→2 (tanh) on Named('shop.csv')\nbackend autograd"),
    (lambda: RegressionTask(net=torch.nn.Linear(3, 1)), _Unnamed, {}, "RegressionTask: Linear on _Unnamed\nbackend manual"),
]


@pytest.mark.parametrize(
    "task, data, metrics, title", TITLES,
    ids=["mlp", "dp", "dp-clip-only", "learning-rule", "digits-cnn", "mnist1d-cnn", "data-repr", "data-class"],
)
def test_curve_titles_say_what_was_trained(task, data, metrics, title):
    trainer = SimpleNamespace(datamodule=data(), callback_metrics=metrics)
    assert TrainingCurves._title(trainer, task()) == title


@pytest.mark.parametrize(
    "config, title",
    [
        ("binary_breast_cancer_dp", "BinaryClassificationTask: MLP 30→32→1 (relu) on scikit-learn's breast_cancer data\n"
                                    "backend manual, DP-SGD σ=1.5, ε={epsilon:.3g} (δ=1e-05)"),
        ("multiclass_digits_cnn", "MulticlassClassificationTask: SmallCNN on scikit-learn's digits data\nbackend manual"),
    ],
)
def test_shipped_configs_plot_what_they_train_by_the_epochs_of_metrics_csv(tmp_path, config, title):
    args = ["fit", "--config", str(config_path(config)), "--trainer.max_epochs=3", f"--trainer.default_root_dir={tmp_path}"]
    fit = build_cli(args + QUIET)
    with (Path(fit.trainer.log_dir) / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    curves = next(c for c in fit.trainer.callbacks if isinstance(c, TrainingCurves))
    assert curves.path.read_bytes()[:4] == b"\x89PNG"
    figure = curves.figure(fit.trainer, fit.model)
    epsilon = [float(r["train/epsilon"]) for r in rows if r.get("train/epsilon")]
    assert figure.get_suptitle() == title.format(epsilon=epsilon[-1] if epsilon else None)
    loss, accuracy = figure.axes
    for axes, keys in ((loss, {"train": "train/loss_epoch", "val": "val/loss"}), (accuracy, {"train": "train/accuracy", "val": "val/accuracy"})):
        assert [line.get_label() for line in axes.lines] == ["train", "val"]
        for line in axes.lines:
            logged = [(int(r["epoch"]), float(r[keys[line.get_label()]])) for r in rows if r.get(keys[line.get_label()])]
            assert [e for e, _ in logged] == [0, 1, 2]  # metrics.csv numbers epochs from 0
            assert list(line.get_xdata()) == [e for e, _ in logged]
            assert list(line.get_ydata()) == pytest.approx([v for _, v in logged])


def test_resume_with_ckpt_path_last_continues_the_latest_run(two_target_run, capsys):
    root, common = two_target_run["root"], two_target_run["common"]
    first = two_target_run["log_dir"] / "checkpoints" / "last.ckpt"
    code, out, err = run_cli(["fit", *common, "--trainer.max_epochs=3", "--ckpt_path", "last"], capsys)
    assert code == 0, err
    resumed = sorted((root / "lightning_logs").glob("version_*"))[-1]
    assert resumed != two_target_run["log_dir"]  # a new folder: docs/lightning.md says how the curves join
    assert yaml.safe_load((resumed / "config.yaml").read_text())["ckpt_path"] == str(first)
    with (resumed / "metrics.csv").open() as f:
        epochs = {int(row["epoch"]) for row in csv.DictReader(f)}
    assert epochs == {2}  # it went on from the checkpoint's epoch, not from 0
    state = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 2
    curves = next(v for k, v in state["callbacks"].items() if "TrainingCurves" in k)["history"]
    assert [epoch for epoch, _ in curves["train/loss"]] == [0, 1, 2]  # the plot holds every epoch
    assert f"resume with --ckpt_path last ({resumed / 'checkpoints' / 'last.ckpt'})" in out


def test_test_and_predict_from_the_checkpoint_write_predictions_csv(two_target_run, capsys, tmp_path):
    common, fit = two_target_run["common"], two_target_run["fit"]
    checkpoint = two_target_run["log_dir"] / "checkpoints" / "last.ckpt"
    code, out, err = run_cli(["predict", *common, f"--ckpt_path={checkpoint}"], capsys)
    assert code == 0, err
    path = Path(out.strip().splitlines()[-1].removeprefix("manual-backprop: predictions written to "))
    lines = path.read_text().splitlines()
    assert lines[0] == "row,price,rooms"
    data = fit.datamodule
    rows = [int(line.split(",")[0]) for line in lines[1:]]
    assert rows == data.rows["test"].tolist()  # the test split's rows, numbered as in the CSV
    model = RegressionTask.load_from_checkpoint(checkpoint, weights_only=True)
    x = data.splits["test"].tensors[0]
    with torch.no_grad():
        expected = model.predictions(model(x))
    got = torch.tensor([[float(v) for v in line.split(",")[1:]] for line in lines[1:]])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)  # in target units (6 digits in the file)
    assert 100 < got[:, 0].mean() < 500

    # A new file without the target columns, scaled with the checkpoint's scalers, even when the
    # training CSV named in the config has changed since (its own scalers would differ).
    raw = np.loadtxt(two_target_run["table"], delimiter=",", skiprows=1)
    new = tmp_path / "new.csv"
    new.write_text("dist,size,age\n" + "\n".join(f"{r[2]},{r[0]},{r[1]}" for r in raw[:5]) + "\n")
    changed = write_table(tmp_path / "changed.csv", ["size", "age", "dist", "price", "rooms"], 60, seed=7)
    args = ["predict", *common, f"--data.init_args.path={changed}", f"--data.init_args.predict_path={new}", f"--ckpt_path={checkpoint}"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    path = Path(out.strip().splitlines()[-1].removeprefix("manual-backprop: predictions written to "))
    lines = path.read_text().splitlines()
    assert lines[0] == "row,price,rooms" and [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3", "4", "5"]
    scaled = (raw[:5, :3] - data.feature_mean) / data.feature_scale
    with torch.no_grad():
        expected = model.predictions(model(torch.tensor(scaled, dtype=torch.float32)))
    got = torch.tensor([[float(v) for v in line.split(",")[1:]] for line in lines[1:]])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)

    code, out, err = run_cli(["test", *common, "--ckpt_path", "last"], capsys)
    assert code == 0 and "test/r2/rooms" in out and "test/mae/price" in out
    manual = [line for line in out.splitlines() if "test/r2/rooms" in line]
    # The same checkpoint on stock autograd: the command line's backend wins over the checkpoint's.
    code, out, err = run_cli(["test", *common, "--ckpt_path", "last", "--model.init_args.backend=autograd"], capsys)
    assert code == 0 and [line for line in out.splitlines() if "test/r2/rooms" in line] == manual
    stock = build_cli(["test", *common, "--ckpt_path", "last", "--model.backend", "autograd"])
    assert type(stock.model.net) is torch.nn.Sequential and stock.model.hparams["backend"] == "autograd"

    # Data with another number of columns than the checkpoint's: one line, not torch's size-mismatch traceback.
    wider = write_table(tmp_path / "wider.csv", ["size", "age", "dist", "extra", "price", "rooms"], 60)
    code, out, err = run_cli(["test", *common, f"--data.init_args.path={wider}", f"--ckpt_path={checkpoint}"], capsys)
    assert code == 2 and err.startswith("manual-backprop: error: the checkpoint's net.layers.0.weight has shape (32, 3), this model's (32, 4)")


def test_classifier_predictions_name_the_data_labels(tmp_path, capsys):
    table = write_table(tmp_path / "kinds.csv", ["a", "b", "kind"], 90, labels=[3, 5, 7])
    common = [
        "--config", CSV_CONFIG, f"--data.init_args.path={table}", "--data.init_args.target_columns=[kind]",
        "--data.init_args.task=multiclass", "--model=MulticlassClassificationTask", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1", *QUIET,
    ]  # fmt: skip
    assert run_cli(["fit", *common], capsys)[0] == 0
    code, out, err = run_cli(["predict", *common, "--ckpt_path", "last"], capsys)
    assert code == 0, err
    lines = Path(out.strip().split("predictions written to ")[-1]).read_text().splitlines()
    assert lines[0] == "row,kind,p_3,p_5,p_7"
    for line in lines[1:]:
        row, label, *p = line.split(",")
        assert int(label) == [3, 5, 7][max(range(3), key=lambda j: float(p[j]))]
        assert sum(map(float, p)) == pytest.approx(1, abs=1e-4)


ERRORS = [
    # (name, CSV text or None, extra args, the one line the user must see)
    ("bad cell", "a,b,y\n1,2,3\n4,five,6\n", [], "{csv}: row 2 (line 3), column 'b' holds 'five', which is not a number"),
    ("missing column", "a,b,price\n1,2,3\n", [], "{csv}: no column 'y'; the columns are: a, b, price"),
    ("one-class binary", "a,y\n" + "".join(f"{i},1\n" for i in range(20)), ["--data.init_args.task=binary", "--model=BinaryClassificationTask"],
     "binary targets hold only the value 1 in all 20 rows: a classifier needs rows of both classes 0 and 1"),
    ("too few rows", "a,y\n1,0\n2,1\n3,0\n4,1\n5,1\n", ["--data.init_args.task=binary", "--model=BinaryClassificationTask"],
     "{csv} has 5 rows, too few to split into train / val / test with val_fraction=0.15 and test_fraction=0.15: "
     "each split needs a row of each of the 2 classes (stratified), which takes at least 8 rows"),
    ("regression rows", "a,y\n1,0\n2,1\n", [], "{csv} has 2 rows, too few to split into train / val / test"),
    ("multiclass model, regression data", "a,y\n" + "".join(f"{i},{i % 3}\n" for i in range(30)), ["--model=MulticlassClassificationTask"],
     "MulticlassClassificationTask needs num_classes (an integer >= 2); got None. The CLI links it from the data module's "
     "num_classes, which is None when the data's task is regression"),
    ("regression model, binary data", "a,y\n" + "".join(f"{i},{i % 2}\n" for i in range(30)), ["--data.init_args.task=binary"],
     "RegressionTask trains on regression data, but CSVDataModule holds a binary task; pick the matching task class"),
    ("bad hidden size", "a,y\n" + "".join(f"{i},{i}\n" for i in range(30)), ["--model.init_args.hidden_sizes=[4,0]"],
     "hidden_sizes[1] must be a positive integer; got 0 (hidden_sizes=[4, 0])"),
    ("missing file", None, [], "CSV file not found: {csv}"),
]


@pytest.mark.parametrize("name, text, extra, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_user_input_errors_are_one_line_and_exit_2(tmp_path, capsys, name, text, extra, message):
    csv_path = tmp_path / "data.csv"
    if text is not None:
        csv_path.write_text(text)
    args = ["fit", "--config", CSV_CONFIG, f"--data.init_args.path={csv_path}", "--data.init_args.target_columns=[y]",
            f"--trainer.default_root_dir={tmp_path}", *extra, *QUIET]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    expected = "manual-backprop: error: " + message.format(csv=csv_path)
    assert code == 2 and err.startswith(expected) and err.count("\n") == 1, err  # first and alone
    assert not (tmp_path / "lightning_logs").exists()  # nothing started


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_evaluating_without_a_checkpoint_is_refused_unless_asked(tmp_path, capsys, subcommand):
    args = [subcommand, "--config", str(config_path("binary_breast_cancer")), f"--trainer.default_root_dir={tmp_path}", *QUIET]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.startswith(f"manual-backprop: error: {subcommand} needs --ckpt_path: without a checkpoint")
    code, _, err = run_cli([*args, "--ckpt_path", "last"], capsys)
    assert code == 2 and err == f"manual-backprop: error: --ckpt_path last: no last.ckpt under {tmp_path / 'lightning_logs'}/version_*/checkpoints/; train first (`fit`), or pass --ckpt_path=PATH/TO.ckpt\n"
    if subcommand == "validate":  # asked for: it runs
        code, _, err = run_cli([*args, "--allow_untrained=true", "--trainer.limit_val_batches=1"], capsys)
        assert code == 0, err


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("a bug in our plot")

    monkeypatch.setattr(TrainingCurves, "_plot", broken)
    monkeypatch.setattr(sys, "path", list(sys.path))
    args = ["fit", "--config", str(config_path("regression_diabetes")), "--trainer.max_steps=1",
            f"--trainer.default_root_dir={tmp_path}", *QUIET]  # fmt: skip
    with pytest.raises(RuntimeError, match="a bug in our plot"):
        cli_main(args)
    assert "manual-backprop: error" not in capsys.readouterr().err


def test_a_net_next_to_the_config_imports_and_its_checkpoint_reloads_alone(tmp_path, monkeypatch, capsys):
    (tmp_path / "mynet_x1.py").write_text(
        "import torch\n\nclass MyNet(torch.nn.Sequential):\n    def __init__(self, width: int = 4):\n"
        "        super().__init__(torch.nn.Linear(30, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # as a console script
    config = {
        "model": {"class_path": "lightning_modules.BinaryClassificationTask",
                  "init_args": {"net": {"class_path": "mynet_x1.MyNet", "init_args": {"width": 6}}}},
        "data": {"class_path": "lightning_modules.SklearnDataModule", "init_args": {"dataset": "breast_cancer"}},
        "trainer": {"max_epochs": 1, "callbacks": [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]},
    }  # fmt: skip
    (tmp_path / "net.yaml").write_text(yaml.safe_dump(config))
    code, out, err = run_cli(["fit", "--config", "net.yaml", *QUIET], capsys)
    assert code == 0, err
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert saved["net"] == {"class_path": "mynet_x1.MyNet", "init_args": {"width": 6}}
    assert "hidden_sizes" not in saved and "activation" not in saved  # the run never used them
    logged = yaml.safe_load((checkpoint.parents[1] / "hparams.yaml").read_text())
    assert "hidden_sizes" not in logged and logged["net"]["init_args"] == {"width": 6}
    restored = BinaryClassificationTask.load_from_checkpoint(checkpoint, weights_only=True)  # no net= needed
    assert type(restored.net).__name__ == "MyNet" and type(restored.net[0]) is mnn.Linear  # converted: backend manual
    assert restored.hparams["net"] == saved["net"]  # and reloads again from its own checkpoint
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    for key, value in restored.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_help_says_what_the_command_is(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and out.startswith("usage: manual-backprop") and "on hand-written backprop rules" in " ".join(out.split())
    code, out, _ = run_cli(["fit", "--help"], capsys)
    assert code == 0 and "--ckpt_path" in out and "--allow_untrained" in out


def test_logger_false_says_where_files_go(tmp_path, capsys):
    args = ["fit", "--config", str(config_path("regression_diabetes")), "--trainer.max_steps=1", "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}", *QUIET]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0 and f"--trainer.logger=false: writing config.yaml, checkpoints and plots under {tmp_path}" in err


def readme_commands() -> list[str]:
    """The `manual-backprop fit ...` commands of README.md and docs/*.md, continuation lines joined."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(page.read_text() for page in pages).replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip().startswith("manual-backprop fit ")]


def test_readme_fit_commands_parse_and_set_max_epochs(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the pages' paths are relative to a clone
    commands = readme_commands()
    assert len(commands) >= 5
    for command in commands:
        args = shlex.split(command.split("#")[0])[1:]
        if any(a.startswith("--data.init_args.path=") for a in args):
            continue  # names the user's own CSV
        code, out, err = run_cli([*args, "--print_config"], capsys)
        assert code == 0, (command, err)
        assert yaml.safe_load(out)["trainer"]["max_epochs"] is not None, command  # not Lightning's 1000


@pytest.mark.slow
def test_console_script_error_is_one_line_and_output_is_quiet(tmp_path):
    script = Path(sys.executable).parent / "manual-backprop"
    (tmp_path / "data.csv").write_text("a,b,y\n1,2,3\n4,five,6\n")
    done = subprocess.run([str(script), "fit", "--config", CSV_CONFIG, "--data.init_args.path=data.csv"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "manual-backprop: error: data.csv: row 2 (line 3), column 'b' holds 'five', which is not a number\n"
    assert done.stdout == ""


def readme_walkthrough() -> list[list[str]]:
    """The commands of docs/lightning.md's "Your own CSV" walkthrough, as argument lists."""
    section = (ROOT / "docs" / "lightning.md").read_text().split("### Your own CSV", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("manual-backprop ")]


def test_readme_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    """fit → resume → test → predict, word for word, in a folder holding the user's two CSVs."""
    (tmp_path / "lightning_modules").symlink_to(ROOT / "lightning_modules")  # the paths are a clone's
    monkeypatch.chdir(tmp_path)
    write_table(tmp_path / "houses.csv", ["size", "rooms", "age", "price"], 100)
    new = write_table(tmp_path / "all.csv", ["size", "rooms", "age", "price"], 7, seed=3).read_text().splitlines()
    (tmp_path / "new_houses.csv").write_text("\n".join(",".join(line.split(",")[:3]) for line in new) + "\n")
    commands = readme_walkthrough()
    assert [args[0] for args in commands] == ["fit", "fit", "test", "predict"]
    outputs = []
    for args in commands:
        code, out, err = run_cli([*args, *QUIET], capsys)
        assert code == 0, (args, err)
        outputs.append(out)
    assert "resume with --ckpt_path last" in outputs[0] and "test/r2" in outputs[2]
    predictions = Path(outputs[3].strip().split("predictions written to ")[-1]).read_text().splitlines()
    assert predictions[0] == "row,price" and len(predictions) == 8


def test_prediction_columns_per_task():
    columns = PredictionWriter.columns
    header, values = columns("binary", torch.tensor([0.2, 0.9]), ["malignant"], None)
    assert header == ["malignant", "p_0", "p_1"] and [list(v) for v in zip(*values)] == [[0, "0.8", "0.2"], [1, "0.1", "0.9"]]
    header, values = columns("regression", torch.tensor([[1.5, 20.0]]), ["price", "rooms"], None)
    assert header == ["price", "rooms"] and values == [["1.5"], ["20"]]
    header, values = columns("multiclass", torch.tensor([[0.1, 0.7, 0.2]]), ["kind"], np.array([3, 5, 7]))
    assert header == ["kind", "p_3", "p_5", "p_7"] and [v[0] for v in values] == [5, "0.1", "0.7", "0.2"]


# ------------------------------------------------------------------ strict, one-line errors; threads; configs by name

DIGITS = str(config_path("multiclass_digits"))


@pytest.mark.parametrize("args, line", [
    (["--model.init_args.hiden_sizes=[3]"],
     "unknown key 'model.init_args.hiden_sizes' for lightning_modules.MulticlassClassificationTask; did you mean 'hidden_sizes'?"),
    (["--data.init_args.batch_sise=3"],
     "unknown key 'data.init_args.batch_sise' for lightning_modules.SklearnDataModule; did you mean 'batch_size'?"),
    (["--trainer.max_epoch=3"],  # an abbreviation of max_epochs: refused, not expanded
     "unknown option --trainer.max_epoch for pytorch_lightning.Trainer; did you mean 'trainer.max_epochs'?"),
], ids=["model-key", "data-key", "abbreviation"])
def test_a_mistyped_option_is_one_line_naming_the_key_its_class_and_the_closest_key(tmp_path, capsys, args, line):
    code, out, err = run_cli(["fit", "--config", DIGITS, f"--trainer.default_root_dir={tmp_path}", *args], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == f"manual-backprop: error: {line}"
    assert "usage:" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("old, new, line", [
    ("hidden_sizes:", "hiden_sizes:",
     "unknown key 'model.init_args.hiden_sizes' for lightning_modules.MulticlassClassificationTask; did you mean 'hidden_sizes'?"),
    ("max_epochs:", "max_epoch:", "unknown key 'trainer.max_epoch' in {path} for pytorch_lightning.Trainer; did you mean 'trainer.max_epochs'?"),
], ids=["model-key", "trainer-key"])
def test_a_mistyped_config_key_is_one_line_too(tmp_path, capsys, old, new, line):
    path = tmp_path / "typo.yaml"
    path.write_text(Path(DIGITS).read_text().replace(old, new))
    code, out, err = run_cli(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path}"], capsys)
    assert code == 2 and err.strip().splitlines() == [f"manual-backprop: error: {line.format(path=path)}"]


def test_threads_default_to_one_are_printed_and_set(tmp_path, capsys, monkeypatch):
    from lightning_modules.cli import DEFAULT_THREADS

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, out, err = run_cli(["fit", "--config", DIGITS, "--trainer.fast_dev_run=true",
                                  f"--trainer.default_root_dir={tmp_path}", *QUIET], capsys)
        assert code == 0 and DEFAULT_THREADS == 1
        assert "manual-backprop: 1 torch thread (--threads)" in out and torch.get_num_threads() == 1
        code, out, err = run_cli(["fit", "--config", DIGITS, "--threads=2", "--trainer.fast_dev_run=true",
                                  f"--trainer.default_root_dir={tmp_path}", *QUIET], capsys)
        assert "manual-backprop: 2 torch threads (--threads)" in out and torch.get_num_threads() == 2
        code, out, err = run_cli(["fit", "--config", DIGITS, "--threads=0", f"--trainer.default_root_dir={tmp_path}"], capsys)
        assert code == 2 and "threads must be a positive integer; got 0" in err
    finally:
        torch.set_num_threads(threads)


def test_a_shipped_config_by_name_from_any_folder_and_the_list_of_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", "--config", "multiclass_digits", "--trainer.fast_dev_run=true", *QUIET])
    assert cli.trainer.global_step == 1 and type(cli.datamodule) is SklearnDataModule
    code, out, err = run_cli(["configs"], capsys)
    assert code == 0
    names = [line.split()[0] for line in out.splitlines() if line.strip() and not line.startswith("run one")]
    assert names == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    code, out, err = run_cli(["fit", "--config", "nope"], capsys)
    assert code == 2 and "--config nope: no such file, and no shipped config 'nope'" in err
