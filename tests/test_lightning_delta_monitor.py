"""DeltaMonitor: δ per layer logged through a real Trainer's CSVLogger, and its plot; from the CLI too."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from lightning_modules import ConfigError, DeltaMonitor, MulticlassClassificationTask, SklearnDataModule, config_path
from lightning_modules.cli import build_cli

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)


def metrics_rows(logger: CSVLogger) -> list[dict]:
    with open(logger.experiment.metrics_file_path) as f:
        return list(csv.DictReader(f))


def fit(tmp_path, backend="manual", every_n_steps=2, max_steps=6, **model_kwargs):
    pl.seed_everything(0)
    data = SklearnDataModule("digits", batch_size=128, sampling="shuffle")  # batches of 128, private or not
    data.setup("fit")
    model_kwargs = dict(hidden_sizes=[16, 16], activation="sigmoid", **model_kwargs)
    model = MulticlassClassificationTask(data.num_features, data.num_classes, backend=backend, **model_kwargs)
    monitor = DeltaMonitor(every_n_steps=every_n_steps)
    logger = CSVLogger(tmp_path)
    trainer = pl.Trainer(max_steps=max_steps, logger=logger, callbacks=[monitor], default_root_dir=tmp_path, **QUIET)
    trainer.fit(model, datamodule=data)
    return monitor, logger, trainer


def test_logs_delta_per_layer_every_n_steps_and_writes_the_plot(tmp_path):
    monitor, logger, trainer = fit(tmp_path)
    layers = ["net.layers.0", "net.layers.1", "net.layers.2"]
    assert list(monitor.history) == layers  # forward order
    rows = [row for row in metrics_rows(logger) if row.get("delta/net.layers.0")]
    assert [int(row["step"]) for row in rows] == [0, 2, 4]
    for row in rows:
        values = [float(row[f"delta/{layer}"]) for layer in layers]
        assert all(math.isfinite(v) and v > 0 for v in values)
    # sigmoid: δ shrinks towards the input (σ' ≤ 1/4)
    assert float(rows[0]["delta/net.layers.0"]) < float(rows[0]["delta/net.layers.2"])
    assert monitor.path == Path(trainer.log_dir) / "delta.png" and monitor.path.stat().st_size > 10_000
    assert monitor.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class FirstBatch(pl.Callback):
    """Keeps the first training batch and the weights it ran on."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.batch, self.state = batch, {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_logged_value_is_the_norm_of_delta_on_that_batch(tmp_path):
    import manual_backprop

    pl.seed_everything(0)
    data = SklearnDataModule("digits", batch_size=128)
    data.setup("fit")
    model = MulticlassClassificationTask(data.num_features, data.num_classes, hidden_sizes=[16], activation="tanh", backend="manual")
    monitor, first = DeltaMonitor(every_n_steps=5), FirstBatch()
    pl.Trainer(max_steps=1, logger=False, callbacks=[first, monitor], default_root_dir=tmp_path, **QUIET).fit(model, datamodule=data)
    model.load_state_dict(first.state)
    x, y = first.batch
    with manual_backprop.tape(model, keep="delta") as tape:
        model.loss_fn(*model.loss_inputs(model(x), y)).backward()
    assert sorted(monitor.history) == sorted(tape.names) == ["net.layers.0", "net.layers.1"]
    for name, points in monitor.history.items():
        assert points[0][0] == 0
        assert points[0][1] == pytest.approx(tape.delta[name].norm().item(), rel=1e-5)


def test_autograd_backend_logs_nothing_and_warns_once(tmp_path):
    with pytest.warns(UserWarning, match="no layer of MulticlassClassificationTask reported δ") as record:
        monitor, logger, _ = fit(tmp_path, backend="autograd")
    assert monitor.history == {} and monitor.path is None
    assert sum("reported δ" in str(w.message) for w in record) == 1
    assert not any(key.startswith("delta/") for key in metrics_rows(logger)[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(every_n_steps=0), "every_n_steps"),
    (dict(reduce="per_sample_norm"), "'per_sample_norm'"),
])
def test_bad_settings_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DeltaMonitor(**kwargs)


def test_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["manual-backprop"])
    args = [
        "fit", "--config", str(config_path("multiclass_digits")), "--trainer.max_steps=4",
        "--trainer.callbacks+=lightning_modules.callbacks.DeltaMonitor", "--trainer.callbacks.every_n_steps=2",
        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]  # fmt: skip
    cli = build_cli(args)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, DeltaMonitor)]
    assert monitor.every_n_steps == 2 and sorted(monitor.history) == ["net.layers.0", "net.layers.1"]
    assert monitor.path is not None and monitor.path.is_file()
    rows = [row for row in metrics_rows(cli.trainer.logger) if row.get("delta/net.layers.1")]
    assert [int(row["step"]) for row in rows] == [0, 2]


def test_with_dp_sgd_both_watchers_see_every_layer(tmp_path, monkeypatch):
    """DP-SGD watches the network for per-sample norms while DeltaMonitor watches the task."""
    import manual_backprop

    try:
        import opacus  # noqa: F401  (the accountant)
    except ImportError:  # privacy accounting is beside the point here
        monkeypatch.setattr(manual_backprop.privacy, "accountant", lambda *args, **kwargs: None)
    clipped = []
    clip = manual_backprop.privacy.clip_and_noise_
    monkeypatch.setattr(manual_backprop.privacy, "clip_and_noise_", lambda ps, *args, **kwargs: clipped.append(ps.norms) or clip(ps, *args, **kwargs))
    monitor, logger, trainer = fit(tmp_path, dp_noise_multiplier=1.0, dp_max_grad_norm=1.0)
    assert len(clipped) == 6 and all(norms.shape == (128,) for norms in clipped)
    assert list(monitor.history) == ["net.layers.0", "net.layers.1", "net.layers.2"]
    assert all(math.isfinite(v) for points in monitor.history.values() for _, v in points)


def test_with_feedback_alignment_it_logs_the_delta_that_rule_sends(tmp_path):
    import manual_backprop

    torch.manual_seed(0)
    stock = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    net = manual_backprop.convert(stock, registry="feedback_alignment")
    pl.seed_everything(0)
    data = SklearnDataModule("digits", batch_size=128)
    data.setup("fit")
    model = MulticlassClassificationTask(data.num_features, data.num_classes, hidden_sizes=[], activation="tanh",
                                         backend="autograd", net=net)  # used as is: its rules are feedback alignment's
    monitor, first = DeltaMonitor(every_n_steps=3), FirstBatch()
    pl.Trainer(max_steps=1, logger=False, callbacks=[first, monitor], default_root_dir=tmp_path, **QUIET).fit(model, datamodule=data)
    model.load_state_dict(first.state)
    x, y = first.batch
    output = model(x)
    loss = model.loss_fn(*model.loss_inputs(output, y))
    (delta_top,) = torch.autograd.grad(loss, output)
    delta_hidden = (delta_top @ net[2].feedback) * (1 - torch.tanh(net[0](x)) ** 2)  # δ through B, not W
    assert monitor.history["net.2"][0][1] == pytest.approx(delta_top.norm().item(), rel=1e-5)
    assert monitor.history["net.0"][0][1] == pytest.approx(delta_hidden.norm().item(), rel=1e-5)


@pytest.mark.slow
def test_resumed_run_plots_every_recorded_step(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    data = SklearnDataModule("digits", batch_size=256)
    data.setup("fit")

    def run(max_steps, ckpt_path=None):
        model = MulticlassClassificationTask(data.num_features, data.num_classes, hidden_sizes=[8], activation="tanh", backend="manual")
        monitor = DeltaMonitor(every_n_steps=2)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        kwargs = {**QUIET, "enable_checkpointing": True}
        pl.Trainer(max_steps=max_steps, logger=False, callbacks=[monitor, checkpoints], default_root_dir=tmp_path,
                   **kwargs).fit(model, datamodule=data, ckpt_path=ckpt_path)
        return monitor

    run(5)  # one epoch of 5 batches: steps 0, 2, 4 recorded, then last.ckpt
    resumed = run(9, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [step for step, _ in resumed.history["net.layers.0"]] == [0, 2, 4, 6, 8]
