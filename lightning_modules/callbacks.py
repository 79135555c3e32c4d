"""What the CLI writes into a run's log folder: the end-of-fit plot of the loss and main metric
curves, and the predictions of `predict`."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn


class TrainingCurves(pl.Callback):
    """Records train and validation loss and the task's main metric each epoch, and at the
    end of fit writes `filename` (a PNG) into `trainer.log_dir`: titled with what was trained
    (task class, network, data, backend, learning rule, DP-SGD's σ, ε and δ), epochs numbered
    from 0 as in metrics.csv.

    The history lives in the callback's state, so a resumed run plots every epoch.
    The figure is drawn with matplotlib's Agg canvas directly, leaving pyplot's global
    backend alone. Nothing is written under fast_dev_run.
    """

    def __init__(self, filename: str = "training_curves.png") -> None:
        self.filename = filename
        self.history: dict[str, list[list[float]]] = {}  # "train/loss" -> [[epoch, value], ...]
        self.path: Optional[Path] = None  # where the last plot went

    @staticmethod
    def _keys(pl_module: pl.LightningModule, stage: str) -> dict[str, str]:
        """Logged key -> curve name for `stage`: the loss and, if the task names one, its main metric."""
        loss_key = f"{stage}/loss_epoch" if stage == "train" else f"{stage}/loss"
        keys = {loss_key: f"{stage}/loss"}
        main = getattr(pl_module, "main_metric", "loss")
        if main != "loss":
            keys[f"{stage}/{main}"] = f"{stage}/{main}"
        return keys

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        metrics = trainer.callback_metrics
        for key, name in self._keys(pl_module, stage).items():
            if key in metrics:
                self.history.setdefault(name, []).append([trainer.current_epoch, float(metrics[key])])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, pl_module, "val")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or not self.history:
            return
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / self.filename
        self._plot(trainer, pl_module)

    @staticmethod
    def _title(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """What was trained, on two lines, e.g.
        "BinaryClassificationTask: MLP 30→32→1 (relu) on scikit-learn's breast_cancer data
        backend manual, DP-SGD σ=1.5, ε=4.62 (δ=1e-05)"."""
        hparams = getattr(pl_module, "hparams", {})
        datamodule = getattr(trainer, "datamodule", None)
        if hasattr(datamodule, "describe_source"):
            source = datamodule.describe_source()
        elif datamodule is not None and type(datamodule).__repr__ is not object.__repr__:
            source = repr(datamodule)
        else:
            source = type(datamodule).__name__
        what = f"{type(pl_module).__name__}: "
        net = getattr(pl_module, "net", None)
        linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)] if isinstance(net, torch.nn.Module) else []
        if getattr(pl_module, "_builtin_network", False) and linears:  # an MLP on either backend: its widths
            sizes = [linears[0].in_features, *(m.out_features for m in linears)]
            what += f"MLP {'→'.join(map(str, sizes))}" + (f" ({hparams['activation']}) " if hparams.get("activation") else " ")
        elif isinstance(net, torch.nn.Module):  # a `net` given: its class, also once converted to our rules
            what += f"{type(net).__name__} "
        how = []
        if hparams.get("backend"):
            how.append(f"backend {hparams['backend']}")
        if hparams.get("learning_rule", "backprop") != "backprop":
            how.append(f"learning rule {hparams['learning_rule']}")
        if hparams.get("dp_noise_multiplier") is not None:
            private = f"DP-SGD σ={hparams['dp_noise_multiplier']:g}"
            epsilon = trainer.callback_metrics.get("train/epsilon")  # the privacy spent, logged each epoch
            if epsilon is not None:
                private += f", ε={'∞' if math.isinf(float(epsilon)) else format(float(epsilon), '.3g')}"
            how.append(f"{private} (δ={hparams.get('dp_delta', 1e-5):g})")
        return f"{what}on {source}" + ("\n" + ", ".join(how) if how else "")

    @staticmethod
    def _metric_label(pl_module: pl.LightningModule, metric: str) -> str:
        name = {"r2": "R²", "mse": "MSE", "mae": "MAE", "f1": "F1", "auroc": "AUROC"}.get(metric, metric)
        if metric in ("r2", "mse", "mae"):  # R² has no units; MSE and MAE are in the target's
            outputs = getattr(pl_module, "out_features", 1)
            if outputs > 1:
                name += f" (mean over {outputs} targets)"
            elif metric != "r2":
                name += " (target units)"
        elif metric == "accuracy" and getattr(pl_module, "task", "") == "multiclass":
            name += " (micro: fraction correct)"
        return name

    @rank_zero_only
    def _plot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.figure(trainer, pl_module).savefig(self.path, dpi=100)

    def figure(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        """The plot of the history as a matplotlib Figure: loss and main metric against the epoch,
        numbered as Lightning numbers it (from 0, as the `epoch` column of metrics.csv)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        main_metric = getattr(pl_module, "main_metric", "loss")
        labels = {"loss": getattr(pl_module, "loss_label", "loss"), main_metric: self._metric_label(pl_module, main_metric)}
        panels = ["loss"] + ([main_metric] if main_metric != "loss" else [])
        figure = Figure(figsize=(5 * len(panels), 4), layout="constrained")
        FigureCanvasAgg(figure)
        figure.suptitle(self._title(trainer, pl_module))
        for i, metric in enumerate(panels, start=1):
            axes = figure.add_subplot(1, len(panels), i)
            for stage in ("train", "val"):
                points = self.history.get(f"{stage}/{metric}")
                if points:
                    epochs, values = zip(*points)
                    axes.plot(epochs, values, marker="." if len(points) < 30 else None, label=stage)
            axes.set_xlabel("epoch")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_ylabel(labels[metric])
            axes.grid(alpha=0.3)
            axes.legend()
        return figure

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: [list(p) for p in v] for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [list(p) for p in v] for k, v in state_dict.get("history", {}).items()}


class PredictionWriter(pl.Callback):
    """`predict` writes `filename` (a CSV) into `trainer.log_dir`: one line per input row.

    Columns: `row` (the row's number in its table, 1 = the first row after the header: in
    the data module's CSV for the test split, in `predict_path` for a new file), then
    - regression: one column per target, in the target's units;
    - binary: the predicted label (0/1) under the target's name, then p_0 and p_1;
    - multiclass: the predicted class label under the target's name, then p_<label> per class.
    Class labels are the data's own (a CSV's 3/5/7 stay 3/5/7). On one process only: under
    DDP each process would see a padded share of the rows, so nothing is written there.
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        self.filename = filename
        self.path: Optional[Path] = None  # where the last predictions went
        self._outputs: list = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._outputs, self.path = [], None

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._outputs.append(outputs.detach().float().cpu())

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            rank_zero_warn(f"{self.filename} is written on one process only: predict with --trainer.devices=1")
            return
        if not self._outputs:
            return
        import torch

        predictions = torch.cat(self._outputs)
        datamodule = getattr(trainer, "datamodule", None)
        rows = datamodule.predict_rows() if hasattr(datamodule, "predict_rows") else range(1, len(predictions) + 1)
        names = list(getattr(datamodule, "target_names", None) or ["target"])
        classes = getattr(datamodule, "classes", None)
        header, columns = self.columns(getattr(pl_module, "task", ""), predictions, names, classes)
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / self.filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["row", *header])
            for row, values in zip(rows, zip(*columns)):
                writer.writerow([int(row), *values])
        self._outputs = []

    @staticmethod
    def columns(task: str, predictions, names: list[str], classes) -> tuple[list[str], list[list]]:
        """Header and value columns of the predictions of one task."""
        if task == "regression":
            values = predictions.reshape(len(predictions), -1)
            return names[: values.shape[1]], [[f"{v:.6g}" for v in values[:, j].tolist()] for j in range(values.shape[1])]
        if task == "binary":
            p1 = predictions.reshape(-1)
            labels = (p1 >= 0.5).long().tolist()
            return [names[0], "p_0", "p_1"], [labels, [f"{1 - p:.6g}" for p in p1.tolist()], [f"{p:.6g}" for p in p1.tolist()]]
        if task == "multiclass":
            labels = [c.item() if hasattr(c, "item") else c for c in (classes if classes is not None else range(predictions.shape[1]))]
            best = predictions.argmax(1).tolist()
            probabilities = [[f"{p:.6g}" for p in predictions[:, j].tolist()] for j in range(predictions.shape[1])]
            return [names[0], *(f"p_{label}" for label in labels)], [[labels[k] for k in best], *probabilities]
        values = predictions.reshape(len(predictions), -1)
        return [f"prediction_{j}" for j in range(values.shape[1])], [values[:, j].tolist() for j in range(values.shape[1])]


class DistributedTeardown(pl.Callback):
    """Destroys the default process group when a stage ends, in every process.

    Lightning destroys NCCL groups at exit, but leaves a gloo group (CPU DDP) to the
    interpreter's shutdown, where its threads sometimes abort the process
    ("terminate called without an active exception", SIGABRT) after training finished.
    The next stage in the same process sets the group up again.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no process leaves while another still talks to it
            dist.destroy_process_group()


# ------------------------------------------------------------ the δ tape

DELTA_STATISTICS = {"norm": "‖δ‖₂ over the batch", "mean_abs": "mean |δ|", "rms": "rms of δ"}


class DeltaMonitor(pl.Callback):
    """Watches δ(l), the error each parametric layer's backward computes, while training.

    Every `every_n_steps` optimizer steps, one training batch runs under
    `manual_backprop.tape(pl_module, keep="delta", reduce=reduce)`: each layer's statistic
    ("norm": ‖δ‖₂ over the batch, "mean_abs" or "rms") is logged as `delta/<layer>`
    through the trainer's loggers, at that step. Layers are named as the tape names them,
    qualified in the LightningModule: "net.layers.0" … for the fused MLP, "net.0" … for a
    converted Sequential. Other batches run untouched (the rules do no extra work).

    At the end of fit, `filename` (a PNG) is written into `trainer.log_dir`: a heatmap of
    log10 of the statistic (layers × steps, input layer at the top) and a line per layer.

    Works with any learning rule whose rules report through `manual_backprop.observe`
    (backprop, feedback alignment: δ is then the error that rule sends down). A network
    whose modules report nothing (backend "autograd": stock modules) logs nothing, with
    one warning. From the CLI: `--trainer.callbacks+=lightning_modules.callbacks.DeltaMonitor`.

    Under DDP only rank 0 records, logs and plots (δ of its share of the global batch); the other
    processes run untouched, so each statistic is logged once, not once per process.
    """

    def __init__(self, every_n_steps: int = 50, reduce: str = "norm", filename: str = "delta.png") -> None:
        from lightning_modules.errors import ConfigError

        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigError(f"DeltaMonitor: every_n_steps must be a positive integer; got {every_n_steps!r}")
        if reduce not in DELTA_STATISTICS:
            raise ConfigError(f"DeltaMonitor: reduce must be one of {', '.join(map(repr, DELTA_STATISTICS))}; got {reduce!r}")
        self.every_n_steps, self.reduce, self.filename = every_n_steps, reduce, filename
        self.history: dict[str, list[list[float]]] = {}  # "net.layers.0" -> [[step, value], ...], layers in forward order
        self.path: Optional[Path] = None  # where the last plot went
        self._tape = None
        self._step = -1  # the optimizer step being recorded (one batch per step under gradient accumulation)
        self._warned = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step % self.every_n_steps or step == self._step:
            return
        import manual_backprop

        self._step = step
        self._tape = manual_backprop.tape(pl_module, keep="delta", reduce=self.reduce)
        self._tape.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        tape = self._close()
        if tape is None:
            return
        values: dict[str, float] = {}
        for step in tape.steps:  # usually one backward; several under manual optimization: the latest wins
            for name in reversed(step.names):  # forward order
                values[name] = float(step.delta[name])
        if not values:
            if not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"DeltaMonitor: no layer of {type(pl_module).__name__} reported δ (its modules run no "
                    "manual_backprop rules: backend 'autograd'?); nothing is logged"
                )
            return
        for name, value in values.items():
            self.history.setdefault(name, []).append([self._step, value])
        metrics = {f"delta/{name}": value for name, value in values.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._step)

    def _close(self):
        tape, self._tape = self._tape, None
        if tape is not None:
            import warnings

            with warnings.catch_warnings():  # "recorded nothing": said once, above
                warnings.simplefilter("ignore")
                tape.__exit__(None, None, None)
        return tape

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        log_dir = trainer.log_dir  # under DDP a broadcast from rank 0: every process asks, also those with no history
        if not self.history:
            return
        self.path = Path(log_dir or trainer.default_root_dir) / self.filename
        self._plot(TrainingCurves._title(trainer, pl_module))

    @rank_zero_only
    def _plot(self, title: str) -> None:
        plot_delta_history(self.history, self.path, DELTA_STATISTICS[self.reduce], title)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: [list(p) for p in v] for k, v in self.history.items()}, "step": self._step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [list(p) for p in v] for k, v in state_dict.get("history", {}).items()}
        self._step = state_dict.get("step", -1)


def plot_delta_history(history: dict[str, list], path: Path, statistic: str = "‖δ‖₂ over the batch", title: str = "") -> None:
    """A PNG at `path`: heatmap of log10 `statistic` (layers × steps, first layer on top) and a line per layer.

    history: layer name -> [[step, value], ...], layers in forward order (input side first).
    """
    import math

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = list(history)
    steps = sorted({step for points in history.values() for step, _ in points})
    column = {step: j for j, step in enumerate(steps)}
    grid = [[math.nan] * len(steps) for _ in layers]
    for i, layer in enumerate(layers):
        for step, value in history[layer]:
            grid[i][column[step]] = math.log10(value) if value > 0 else math.nan

    figure = Figure(figsize=(12, 1.6 + 0.3 * max(len(layers), 8)), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(f"δ(l) per layer while training{': ' + title if title else ''}")
    heat, lines = figure.subplots(1, 2, width_ratios=[1.1, 1])

    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    image = heat.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                        extent=(steps[0] - half, steps[-1] + half, len(layers) - 0.5, -0.5))
    heat.set_yticks(range(len(layers)), layers)
    heat.set_xlabel("training step")
    heat.set_ylabel("layer (input side at the top)")
    heat.set_title("layers × steps")
    figure.colorbar(image, ax=heat, label=f"log10 {statistic}")

    colors = __import__("matplotlib").colormaps["viridis"]
    for i, layer in enumerate(layers):
        points = [(s, v) for s, v in history[layer] if v > 0]
        if points:
            xs, ys = zip(*points)
            lines.plot(xs, ys, color=colors(i / max(len(layers) - 1, 1)), marker="." if len(xs) < 30 else None, label=layer)
    lines.set_yscale("log")
    lines.set_xlabel("training step")
    lines.set_ylabel(f"{statistic} (log scale)")
    lines.set_title("one line per layer (dark: input side)")
    lines.grid(alpha=0.3, which="both")
    if len(layers) <= 16:
        lines.legend(fontsize="small", ncols=2 if len(layers) > 8 else 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
