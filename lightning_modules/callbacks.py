"""End-of-fit plot of the loss and main metric curves, written into the run's log folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only


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
        self._plot(getattr(pl_module, "main_metric", "loss"))

    @rank_zero_only
    def _plot(self, main_metric: str) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        panels = ["loss"] + ([main_metric] if main_metric != "loss" else [])
        figure = Figure(figsize=(5 * len(panels), 3.8), layout="constrained")
        FigureCanvasAgg(figure)
        for i, metric in enumerate(panels, start=1):
            axes = figure.add_subplot(1, len(panels), i)
            for stage in ("train", "val"):
                points = self.history.get(f"{stage}/{metric}")
                if points:
                    epochs, values = zip(*points)
                    axes.plot([e + 1 for e in epochs], values, marker="." if len(points) < 30 else None, label=stage)
            axes.set_xlabel("epoch")
            axes.set_title(metric)
            axes.grid(alpha=0.3)
            axes.legend()
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(self.path, dpi=100)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: [list(p) for p in v] for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [list(p) for p in v] for k, v in state_dict.get("history", {}).items()}
