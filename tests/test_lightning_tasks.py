"""The three task modules: network, losses on our rules, metrics, training, parity, resume, checkpoints."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

import manual_backprop
import manual_backprop.nn as mnn
from lightning_modules.errors import ConfigError
from tests.cases import FUSED_MLP, node_name
from tests.trainers import quiet_trainer
from lightning_modules import (
    ACTIVATIONS,
    BinaryClassificationTask,
    MulticlassClassificationTask,
    RegressionTask,
    SklearnDataModule,
    TrainingCurves,
    build_network,
    state_dict_for_backend,
)




def graph_names(tensor: torch.Tensor) -> set[str]:
    """Names of every grad_fn node behind `tensor`."""
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node_name(node))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


# task class, dataset, extra init args, (our loss grad_fn, stock loss grad_fn)
TASKS = [
    pytest.param(RegressionTask, "diabetes", {}, ("MSELossBackward", "MseLossBackward0"), id="regression"),
    pytest.param(RegressionTask, "linnerud", {"out_features": 3}, ("MSELossBackward", "MseLossBackward0"), id="regression-3"),
    pytest.param(
        BinaryClassificationTask,
        "breast_cancer",
        {},
        ("BinaryCrossEntropyWithLogitsBackward", "BinaryCrossEntropyWithLogitsBackward0"),
        id="binary",
    ),
    pytest.param(
        MulticlassClassificationTask, "iris", {"num_classes": 3}, ("CrossEntropyBackward", "NllLossBackward0"), id="multiclass"
    ),
]


def make_task(task_cls, data: SklearnDataModule, extra: dict, **kwargs):
    return task_cls(in_features=data.num_features, hidden_sizes=[8], activation="tanh", **extra, **kwargs)


# ------------------------------------------------------------------ network


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_backends_build_the_same_network_fused_and_stock(activation):
    torch.manual_seed(0)
    manual = build_network(4, [5, 6], 3, activation, "manual")
    torch.manual_seed(0)
    stock = build_network(4, [5, 6], 3, activation, "autograd")
    assert type(manual) is mnn.MLP and manual.sizes == [4, 5, 6, 3] and manual.output_activation is None
    assert type(manual.activation) is ACTIVATIONS[activation].stock
    assert [type(m) for m in stock] == [torch.nn.Linear, ACTIVATIONS[activation].stock] * 2 + [torch.nn.Linear]
    # Same seed, same weights: the MLP's k-th Linear is the Sequential's module 2k.
    assert list(manual.state_dict()) == [f"layers.{k}.{p}" for k in range(3) for p in ("weight", "bias")]
    assert list(stock.state_dict()) == [f"{2 * k}.{p}" for k in range(3) for p in ("weight", "bias")]
    for key, value in manual.sequential_state_dict().items():
        torch.testing.assert_close(value, stock.state_dict()[key], rtol=0, atol=0)
    x = torch.randn(7, 4)
    torch.testing.assert_close(manual(x), stock(x))
    assert node_name(manual(x).grad_fn) in FUSED_MLP  # the fused rule, one node for the network
    assert not {*FUSED_MLP, "LinearBackward"} & graph_names(stock(x))


def test_no_hidden_layer_is_one_linear_layer():
    net = build_network(4, [], 2, "relu", "manual")
    assert net.sizes == [4, 2] and len(net.layers) == 1
    assert len(build_network(4, [], 2, "relu", "autograd")) == 1


@pytest.mark.parametrize("source, target", [("manual", "autograd"), ("autograd", "manual")])
def test_state_dict_for_backend_renames_the_network_keys_only(source, target):
    torch.manual_seed(0)
    saved = build_network(4, [5, 6], 3, "tanh", source)
    state = {f"net.{k}": v for k, v in saved.state_dict().items()} | {"target_mean": torch.zeros(1)}
    renamed = state_dict_for_backend(state, target, prefix="net.")
    network = build_network(4, [5, 6], 3, "tanh", target)
    network.load_state_dict({k.removeprefix("net."): v for k, v in renamed.items() if k.startswith("net.")})
    assert renamed["target_mean"] is state["target_mean"]
    x = torch.randn(5, 4)
    torch.testing.assert_close(network(x), saved(x), rtol=0, atol=0)
    assert state_dict_for_backend(state, source, prefix="net.") == state  # already in that layout


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(activation="swish"), "unknown activation 'swish'; choose one of: sigmoid, tanh, relu, leaky_relu"),
        (dict(backend="jax"), "backend must be one of 'manual', 'autograd'; got 'jax'"),
        (dict(hidden_sizes=[8, 0]), r"hidden_sizes\[1\] must be a positive integer; got 0"),
        (dict(hidden_sizes=[-3]), r"hidden_sizes\[0\] must be a positive integer; got -3"),
        (dict(hidden_sizes=[2.5]), r"hidden_sizes\[0\] must be a positive integer; got 2.5"),
        (dict(hidden_sizes=[True]), r"hidden_sizes\[0\] must be a positive integer; got True"),
        (dict(in_features=0), "in_features must be a positive integer; got 0"),
    ],
)
def test_bad_network_arguments_name_the_value(kwargs, message):
    args = dict(in_features=4, hidden_sizes=[8], activation="relu", backend="manual") | kwargs
    with pytest.raises(ValueError, match=message):
        RegressionTask(**args)


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: RegressionTask(hidden_sizes=[4]), ValueError, "RegressionTask needs in_features"),
        (lambda: MulticlassClassificationTask(4, num_classes=1), ValueError, "num_classes must be an integer >= 2; got 1"),
        (lambda: MulticlassClassificationTask(4), ValueError, r"needs num_classes \(an integer >= 2\); got None\. The CLI links it"),
        (lambda: RegressionTask(4, out_features=0), ValueError, "out_features must be a positive integer; got 0"),
        (lambda: RegressionTask(4, lr=0.0), ValueError, "lr must be positive; got 0.0"),
        (lambda: RegressionTask(4, weight_decay=-1.0), ValueError, "weight_decay must be >= 0; got -1.0"),
        (lambda: RegressionTask(4, net="mlp"), TypeError, "net must be a torch.nn.Module; got str"),
    ],
)
def test_bad_task_arguments(build, error, message):
    with pytest.raises(error, match=message):
        build()


# ------------------------------------------------------------------ losses run our rules


@pytest.mark.parametrize("task_cls, dataset, extra, grad_fns", TASKS)
@pytest.mark.parametrize("backend", ["manual", "autograd"])
def test_loss_and_network_run_our_rules_only_on_manual(task_cls, dataset, extra, grad_fns, backend):
    data = SklearnDataModule(dataset)
    data.setup()
    model = make_task(task_cls, data, extra, backend=backend)
    batch = next(iter(data.train_dataloader()))
    loss = model.loss_fn(*model.loss_inputs(model(batch[0]), batch[1]))
    ours, stock = grad_fns
    names = graph_names(loss)
    if backend == "manual":
        assert type(loss.grad_fn).__name__ == ours
        assert FUSED_MLP & names  # the built-in network is the fused MLP rule
        assert not any(name.endswith("Backward0") for name in names), names  # nothing fell back to stock
    else:
        assert type(loss.grad_fn).__name__ == stock
        assert not {*FUSED_MLP, "LinearBackward", "TanhBackward"} & names


def test_binary_output_error_is_prediction_minus_target():
    """The notes' δ(L) = ŷ − y for BCE on logits, divided by N for the mean."""
    model = BinaryClassificationTask(3, hidden_sizes=[4])
    z = torch.randn(6, 1, requires_grad=True)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    loss = model.loss_fn(*model.loss_inputs(z, y))
    assert type(loss.grad_fn).__name__ == "BinaryCrossEntropyWithLogitsBackward"
    loss.backward()
    torch.testing.assert_close(z.grad.squeeze(-1), (torch.sigmoid(z.detach().squeeze(-1)) - y) / 6)


# ------------------------------------------------------------------ training


def read_metrics_csv(path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if value != "":
                columns.setdefault(key, []).append(float(value))
    return columns


# task class, dataset, extra args, epochs, lr, main test metric, trivial baseline it must beat
TRAINING = [
    # Predicting the training mean gives R² ≈ 0.
    pytest.param(RegressionTask, "diabetes", {}, 15, 0.01, "r2", 0.2, id="regression"),
    # Always answering the majority class (benign) gives 0.63.
    pytest.param(BinaryClassificationTask, "breast_cancer", {}, 5, 0.01, "accuracy", 0.9, id="binary"),
    # Three balanced classes: guessing gives 0.33.
    pytest.param(MulticlassClassificationTask, "iris", {"num_classes": 3}, 20, 0.02, "accuracy", 0.8, id="multiclass"),
]


@pytest.mark.parametrize("task_cls, dataset, extra, epochs, lr, metric, baseline", TRAINING)
def test_task_trains_beats_baseline_and_logs_to_a_real_csv_logger(
    tmp_path, task_cls, dataset, extra, epochs, lr, metric, baseline
):
    pl.seed_everything(0)
    data = SklearnDataModule(dataset, batch_size=16, test_fraction=0.25)
    model = make_task(task_cls, data, extra, lr=lr)
    logger = CSVLogger(tmp_path, name="run")
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, logger=logger, callbacks=[TrainingCurves()])
    trainer.fit(model, datamodule=data)
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    assert results[f"test/{metric}"] > baseline, results
    # Every logged value is a scalar that reached the CSV file, per stage.
    logged = read_metrics_csv(f"{logger.log_dir}/metrics.csv")
    for stage in ("train", "val", "test"):
        for name in model.test_metrics.keys(keep_base=True):
            assert f"{stage}/{name}" in logged, sorted(logged)
    assert len(logged[f"val/{metric}"]) == epochs and len(logged["train/loss_epoch"]) == epochs
    assert math.isclose(logged[f"test/{metric}"][-1], results[f"test/{metric}"], rel_tol=1e-6)
    png = tmp_path / "run" / "version_0" / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regression_metrics_and_predictions_are_in_target_units(tmp_path):
    pl.seed_everything(0)
    data = SklearnDataModule("diabetes")
    model = RegressionTask(data.num_features, hidden_sizes=[8])
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=data)
    torch.testing.assert_close(model.target_mean, torch.tensor(data.target_mean, dtype=torch.float32))
    predictions = torch.cat(trainer.predict(model, datamodule=data))
    x, y_standardized = data.splits["test"].tensors
    assert predictions.shape == y_standardized.shape == (len(x), 1)
    with torch.no_grad():
        expected = model(x) * float(data.target_scale[0]) + float(data.target_mean[0])
    torch.testing.assert_close(predictions, expected)
    # Diabetes targets run 25..346: predictions in those units, not around 0.
    assert 50 < predictions.mean() < 250
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    y = y_standardized * float(data.target_scale[0]) + float(data.target_mean[0])
    torch.testing.assert_close(torch.tensor(results["test/mse"]), ((predictions - y) ** 2).mean(), rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "task_cls, dataset, extra, shape",
    [
        pytest.param(BinaryClassificationTask, "breast_cancer", {}, lambda n: (n,), id="binary"),
        pytest.param(MulticlassClassificationTask, "wine", {"num_classes": 3}, lambda n: (n, 3), id="multiclass"),
        pytest.param(RegressionTask, "linnerud", {"out_features": 3}, lambda n: (n, 3), id="regression-3"),
    ],
)
def test_predict_returns_probabilities_or_target_units(tmp_path, task_cls, dataset, extra, shape):
    data = SklearnDataModule(dataset)
    model = make_task(task_cls, data, extra)
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=data)
    predictions = torch.cat(trainer.predict(model, datamodule=data))
    n = len(data.splits["test"])
    assert predictions.shape == shape(n)
    if task_cls is BinaryClassificationTask:
        assert ((predictions >= 0) & (predictions <= 1)).all()
    elif task_cls is MulticlassClassificationTask:
        torch.testing.assert_close(predictions.sum(-1), torch.ones(n))
    else:  # linnerud's targets (weight, waist, pulse) are tens to hundreds
        assert predictions.mean() > 10


@pytest.mark.parametrize(
    "model, data, message",
    [
        (lambda: BinaryClassificationTask(10), lambda: SklearnDataModule("diabetes"),
         "BinaryClassificationTask trains on binary data, but SklearnDataModule holds a regression task"),
        (lambda: MulticlassClassificationTask(13, 4), lambda: SklearnDataModule("wine"),
         "MulticlassClassificationTask has num_classes=4 but the data has 3 classes"),
        (lambda: RegressionTask(3, 1), lambda: SklearnDataModule("linnerud"),
         "RegressionTask has out_features=1 but the data has 3 targets"),
    ],
)  # fmt: skip
def test_model_and_data_mismatch_fails_before_training(tmp_path, model, data, message):
    model = model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        quiet_trainer(tmp_path, max_epochs=1).fit(model, datamodule=data())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # not a single step was taken


# ------------------------------------------------------------------ parity, resume, bf16


@pytest.mark.parametrize("task_cls, dataset, extra, grad_fns", TASKS)
def test_manual_and_autograd_backends_train_to_equal_weights_in_float64(tmp_path, task_cls, dataset, extra, grad_fns):
    weights = {}
    for backend in ("manual", "autograd"):
        pl.seed_everything(7)
        data = SklearnDataModule(dataset, batch_size=16)
        model = make_task(task_cls, data, extra, backend=backend, lr=0.01)
        trainer = quiet_trainer(tmp_path, max_steps=12, precision="64-true", limit_val_batches=0)
        trainer.fit(model, datamodule=data)
        # Compare under the Sequential's keys: the MLP's k-th Linear is the Sequential's module 2k.
        weights[backend] = model.net.sequential_state_dict() if backend == "manual" else model.net.state_dict()
        assert all(w.dtype == torch.float64 for w in weights[backend].values())
    assert type(model.net) is torch.nn.Sequential and len(weights["manual"]) == len(weights["autograd"]) == 4
    initial = make_task(task_cls, data, extra).net.sequential_state_dict()  # a different draw: training must have moved
    for key, value in weights["manual"].items():
        torch.testing.assert_close(value, weights["autograd"][key], rtol=1e-10, atol=1e-12)
        assert not torch.allclose(value.float(), initial[key])


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    def run(max_epochs: int, root, ckpt_path=None):
        pl.seed_everything(3)
        data = SklearnDataModule("wine", batch_size=16)
        model = MulticlassClassificationTask(data.num_features, data.num_classes, hidden_sizes=[8], lr=0.01)
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True)
        trainer = quiet_trainer(
            root, max_epochs=max_epochs, deterministic=True, enable_checkpointing=True, callbacks=[checkpoint]
        )
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        return model

    uninterrupted = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed = run(4, tmp_path / "c", ckpt_path=tmp_path / "b" / "last.ckpt")
    interrupted = run(2, tmp_path / "d")
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)
    # The comparison can fail: two more epochs moved the weights.
    assert not torch.allclose(interrupted.net.layers[0].weight, uninterrupted.net.layers[0].weight)


class RecordingTask(BinaryClassificationTask):
    """Records the grad_fn names behind each training loss and its dtype."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.recorded = (graph_names(loss), self(batch[0]).dtype, loss)
        return loss


def test_bf16_mixed_trains_with_our_rules(tmp_path):
    pl.seed_everything(0)
    data = SklearnDataModule("breast_cancer", batch_size=32)
    model = RecordingTask(data.num_features, hidden_sizes=[16], lr=0.01)
    before = copy.deepcopy(model.net.state_dict())
    trainer = quiet_trainer(tmp_path, max_epochs=2, precision="bf16-mixed")
    trainer.fit(model, datamodule=data)
    names, output_dtype, loss = model.recorded
    assert output_dtype == torch.bfloat16  # autocast ran the linear layers in bf16
    assert "BinaryCrossEntropyWithLogitsBackward" in names and FUSED_MLP & names
    assert not {"AddmmBackward0", "ReluBackward0", "BinaryCrossEntropyWithLogitsBackward0"} & names
    assert torch.isfinite(loss)
    assert all(v.dtype == torch.float32 for v in model.net.state_dict().values())  # master weights stay fp32
    assert not torch.equal(before["layers.0.weight"], model.net.layers[0].weight)
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    assert results["test/accuracy"] > 0.85


# ------------------------------------------------------------------ user networks and checkpoints


def user_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(30, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))


@pytest.mark.parametrize("backend", ["manual", "autograd"])
def test_user_network_is_converted_on_manual_and_checkpoint_loads_weights_only(tmp_path, backend):
    pl.seed_everything(0)
    data = SklearnDataModule("breast_cancer")
    net = user_net()
    model = BinaryClassificationTask(net=net, backend=backend)
    assert "net" not in model.hparams
    names = graph_names(model(torch.randn(2, 30)))
    assert ("LinearBackward" in names) == (backend == "manual")
    assert ("TanhBackward" in names) == (backend == "manual")
    assert type(net[0]) is torch.nn.Linear  # convert works on a copy: the user's module is untouched
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="model")
    trainer = quiet_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(model, datamodule=data)
    state = torch.load(tmp_path / "model.ckpt", weights_only=True)
    assert state["hyper_parameters"]["backend"] == backend
    assert "net" not in state["hyper_parameters"]
    restored = BinaryClassificationTask.load_from_checkpoint(tmp_path / "model.ckpt", net=user_net(), weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value)


def test_builtin_network_checkpoint_loads_weights_only_and_restores_target_scaler(tmp_path):
    data = SklearnDataModule("linnerud", val_fraction=0.2, test_fraction=0.2)
    model = RegressionTask(data.num_features, out_features=3, hidden_sizes=[4])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="model")
    quiet_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint]).fit(model, datamodule=data)
    state = torch.load(tmp_path / "model.ckpt", weights_only=True)
    assert state["hyper_parameters"] == {
        "in_features": 3, "out_features": 3, "hidden_sizes": [4], "activation": "relu",
        "backend": "manual", "lr": 1e-3, "weight_decay": 0.0, "target_names": None,
        "dp_noise_multiplier": None, "dp_max_grad_norm": 1.0, "dp_delta": 1e-5, "learning_rule": "backprop", "allow_stock": False,
    }  # fmt: skip
    restored = RegressionTask.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    torch.testing.assert_close(restored.target_mean, torch.tensor(data.target_mean, dtype=torch.float32))
    assert type(restored.net) is mnn.MLP
    for key, value in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("source, target", [("manual", "autograd"), ("autograd", "manual")])
def test_checkpoint_of_one_backend_loads_into_the_other(tmp_path, source, target):
    pl.seed_everything(0)
    data = SklearnDataModule("wine", batch_size=16)
    model = MulticlassClassificationTask(data.num_features, data.num_classes, hidden_sizes=[8], backend=source)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="model")
    trainer = quiet_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(model, datamodule=data)
    (tested,) = trainer.test(model, datamodule=data, verbose=False)

    path = tmp_path / "model.ckpt"
    restored = MulticlassClassificationTask.load_from_checkpoint(path, backend=target, weights_only=True)
    assert restored.hparams.backend == target and type(restored.net) is (mnn.MLP if target == "manual" else torch.nn.Sequential)
    x = data.splits["test"].tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))
    # The trainer's load path (`ckpt_path=`, as the CLI's test/predict use it) renames too.
    fresh = MulticlassClassificationTask(data.num_features, data.num_classes, hidden_sizes=[8], backend=target)
    (retested,) = quiet_trainer(tmp_path).test(fresh, datamodule=data, ckpt_path=path, verbose=False, weights_only=True)
    assert retested["test/accuracy"] == pytest.approx(tested["test/accuracy"])
    assert retested["test/loss"] == pytest.approx(tested["test/loss"], rel=1e-5)


def test_multiclass_accuracy_is_the_fraction_correct_on_imbalanced_labels():
    """Micro accuracy (what the README and the table report), not the macro mean of per-class recalls:
    on balanced iris the two agree, so this uses 8 rows of class 0, 1 of class 1 and 1 of class 2."""
    model = MulticlassClassificationTask(4, num_classes=3, hidden_sizes=[4])
    target = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 2])
    predicted = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # right on every class-0 row, wrong on the others
    logits = torch.nn.functional.one_hot(predicted, 3).float() * 5
    metrics = model.test_metrics
    metrics.update(*model.metric_inputs(logits, target))
    values = metrics.compute()
    assert values["test/accuracy"] == pytest.approx(0.8)  # 8 of 10 right; macro would give (1 + 0 + 0) / 3
    assert values["test/f1_macro"] == pytest.approx((2 * 0.8 / 1.8 + 0 + 0) / 3)  # class 0: precision 0.8, recall 1


# ------------------------------------------------------------------ DP-SGD on our per-sample norms


@pytest.mark.parametrize("task_cls, dataset, extra, grad_fns", TASKS)
def test_dp_sgd_logs_epsilon_each_epoch_and_checkpoints_load_weights_only(tmp_path, task_cls, dataset, extra, grad_fns):
    pl.seed_everything(0)
    data = SklearnDataModule(dataset, batch_size=16, test_fraction=0.25)
    model = make_task(task_cls, data, extra, lr=0.01, dp_noise_multiplier=1.0, dp_max_grad_norm=0.5, dp_delta=1e-4)
    logger = CSVLogger(tmp_path, name="run")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="model")
    trainer = quiet_trainer(tmp_path, max_epochs=2, logger=logger, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(model, datamodule=data)
    epsilon = read_metrics_csv(f"{logger.log_dir}/metrics.csv")["train/epsilon"]
    assert len(epsilon) == 2 and 0 < epsilon[0] < epsilon[1]
    state = torch.load(tmp_path / "model.ckpt", weights_only=True)
    assert {k: state["hyper_parameters"][k] for k in ("dp_noise_multiplier", "dp_max_grad_norm", "dp_delta")} == {
        "dp_noise_multiplier": 1.0, "dp_max_grad_norm": 0.5, "dp_delta": 1e-4}
    task_cls.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)


class FirstStep(pl.Callback):
    """The first training step as Lightning runs it: the batch and weights it starts from, and the gradients the
    optimizer is handed (after training_step, backward and on_after_backward)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.batch = batch
            self.weights = {n: p.detach().clone() for n, p in pl_module.net.named_parameters()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not hasattr(self, "grads"):
            self.grads = {n: p.grad.clone() for n, p in pl_module.net.named_parameters()}


def per_sample_gradients(weights: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """{stock name: (N, *p.shape)} from torch.func on the stock network (backend autograd) carrying `weights`."""
    from torch.func import functional_call, grad, vmap

    stock = build_network(x.shape[1], [8], 1, "tanh", "autograd").double()
    params = state_dict_for_backend(weights, "autograd")

    def loss_one(params, xn, yn):
        out = functional_call(stock, params, (xn.unsqueeze(0),))
        return torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), yn.unsqueeze(0).to(out.dtype))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x.double(), y)


def test_dp_sgd_step_through_the_trainer_is_the_clipped_mean_of_per_sample_gradients(tmp_path):
    """σ = 0: the gradient the optimizer gets is Σₙ cₙ gₙ / N, cₙ = min(1, C / ‖gₙ‖) from each sample's own
    gradient (torch.func on the stock network), C the median norm so some samples are clipped and some not.
    Fixed-size batches ("shuffle"), so the batch is known before fit (Poisson batches: tests below)."""
    data = SklearnDataModule("breast_cancer", batch_size=16, sampling="shuffle")
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    pl.seed_everything(0)
    weights = {n: p.detach().double() for n, p in make_task(BinaryClassificationTask, data, {}).net.named_parameters()}
    norms = torch.stack([g.flatten(1).square().sum(1) for g in per_sample_gradients(weights, x, y).values()]).sum(0).sqrt()
    C = float(norms.median())

    pl.seed_everything(0)
    model = make_task(BinaryClassificationTask, data, {}, dp_noise_multiplier=0.0, dp_max_grad_norm=C).double()
    step = FirstStep()
    trainer = quiet_trainer(tmp_path, max_steps=1, precision="64-true", limit_val_batches=0, callbacks=[step])
    trainer.fit(model, datamodule=data)
    assert trainer.callback_metrics["train/epsilon"] == math.inf  # clipping alone is no privacy
    assert torch.equal(step.batch[0].double(), x.double())
    for name, w in weights.items():
        torch.testing.assert_close(step.weights[name], w, rtol=0, atol=0)

    factors = (C / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    grads = state_dict_for_backend(step.grads, "autograd")
    for name, g in per_sample_gradients(weights, x, y).items():
        torch.testing.assert_close(grads[name], torch.tensordot(factors, g, dims=1) / len(x), rtol=1e-10, atol=1e-12)


def _with_a_parameter_outside_the_network(model):
    model.scale = torch.nn.Parameter(torch.ones(()))
    return model


@pytest.mark.parametrize("trainer_kwargs, change, message", [
    ({"accumulate_grad_batches": 2}, lambda model: model, "accumulate_grad_batches must be 1, got 2"),
    ({}, _with_a_parameter_outside_the_network, "would train without privacy: scale"),
])
def test_dp_sgd_refuses_what_it_cannot_privatise(tmp_path, trainer_kwargs, change, message):
    data = SklearnDataModule("iris", batch_size=32)
    model = change(MulticlassClassificationTask(4, 3, hidden_sizes=[4], dp_noise_multiplier=1.0))
    with pytest.raises(ConfigError, match=message):
        quiet_trainer(tmp_path, max_steps=1, **trainer_kwargs).fit(model, datamodule=data)


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "autograd", "dp_noise_multiplier": 1.0}, "needs backend manual"),
    ({"dp_noise_multiplier": -1.0}, "dp_noise_multiplier >= 0"),
    ({"dp_noise_multiplier": 1.0, "dp_delta": 0.0}, "0 < dp_delta < 1"),
])
def test_bad_dp_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BinaryClassificationTask(in_features=3, **kwargs)


# ------------------------------------------------------------------ DP-SGD with Poisson sampling


def test_an_empty_poisson_batch_steps_with_the_noise_alone_over_the_expected_batch(monkeypatch):
    task = BinaryClassificationTask(30, dp_noise_multiplier=1.5, dp_max_grad_norm=0.5)
    monkeypatch.setattr(task, "_expected_batch_size", lambda: 20.0)
    params = [p for p in task.net.parameters()]
    task.training_step((torch.zeros(0, 30), torch.zeros(0)), 0).backward()
    torch.manual_seed(5)
    task.on_after_backward()
    torch.manual_seed(5)
    for p in params:
        torch.testing.assert_close(p.grad, torch.normal(0.0, 1.5 * 0.5, p.shape) / 20.0)


def test_a_poisson_batch_is_averaged_over_the_expected_batch_not_the_rows_drawn(monkeypatch):
    x, y = torch.randn(7, 30), torch.randint(0, 2, (7,)).float()
    grads = {}
    for expected in (None, 20.0):
        torch.manual_seed(0)
        task = BinaryClassificationTask(30, dp_noise_multiplier=0.0, dp_max_grad_norm=0.5)
        monkeypatch.setattr(task, "_expected_batch_size", lambda expected=expected: expected)
        task.training_step((x, y), 0).backward()
        task.on_after_backward()
        grads[expected] = [p.grad.clone() for p in task.net.parameters()]
    for mean_over_rows, mean_over_expected in zip(grads[None], grads[20.0]):
        torch.testing.assert_close(mean_over_expected, mean_over_rows * 7 / 20)


@pytest.mark.slow
def test_private_fit_with_poisson_sampling_logs_opacus_epsilon_for_its_sample_rate_and_steps(tmp_path):
    from opacus.accountants import PRVAccountant

    from lightning_modules.data import PoissonBatches

    data = SklearnDataModule("breast_cancer", batch_size=64)  # sampling "auto": Poisson for a private task
    model = BinaryClassificationTask(30, dp_noise_multiplier=1.2, dp_max_grad_norm=1.0, dp_delta=1e-5)
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    batches = trainer.train_dataloader.dataset
    assert isinstance(batches, PoissonBatches)
    reference = PRVAccountant()
    reference.history = [(1.2, batches.sample_rate, 2 * len(batches))]
    assert float(trainer.callback_metrics["train/epsilon"]) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)
