"""What the CLI writes into a run's log folder: the end-of-fit plot of the loss and main metric
curves, and the predictions of `predict`."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn


class TrainingCurves(pl.Callback):
    """Records train and validation loss and the task's main metric each epoch, and at the
    end of fit writes `filename` (a PNG) into `trainer.log_dir`.

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
        main = getattr(pl_module, "main_metric", "loss")
        labels = {"loss": getattr(pl_module, "loss_label", "loss"), main: self._metric_label(pl_module, main)}
        self._plot(main, labels, self._title(trainer, pl_module))

    @staticmethod
    def _title(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """e.g. "regression on scikit-learn's diabetes data, backend manual"."""
        task = getattr(pl_module, "task", "") or type(pl_module).__name__
        datamodule = getattr(trainer, "datamodule", None)
        source = datamodule.describe_source() if hasattr(datamodule, "describe_source") else type(datamodule).__name__
        backend = getattr(getattr(pl_module, "hparams", {}), "get", lambda *_: None)("backend")
        return f"{task} on {source}" + (f", backend {backend}" if backend else "")

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
    def _plot(self, main_metric: str, labels: dict[str, str], title: str) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        panels = ["loss"] + ([main_metric] if main_metric != "loss" else [])
        figure = Figure(figsize=(5 * len(panels), 3.8), layout="constrained")
        FigureCanvasAgg(figure)
        figure.suptitle(title)
        for i, metric in enumerate(panels, start=1):
            axes = figure.add_subplot(1, len(panels), i)
            for stage in ("train", "val"):
                points = self.history.get(f"{stage}/{metric}")
                if points:
                    epochs, values = zip(*points)
                    axes.plot([e + 1 for e in epochs], values, marker="." if len(points) < 30 else None, label=stage)
            axes.set_xlabel("epoch")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_ylabel(labels.get(metric, metric))
            axes.grid(alpha=0.3)
            axes.legend()
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(self.path, dpi=100)

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
