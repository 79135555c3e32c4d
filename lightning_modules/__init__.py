"""PyTorch Lightning around manual_backprop: tasks, data modules, the `manual-backprop` CLI.

    from lightning_modules import MulticlassClassificationTask, SklearnDataModule
    data = SklearnDataModule("digits")
    model = MulticlassClassificationTask(data.num_features, data.num_classes, hidden_sizes=[64])
    pytorch_lightning.Trainer(max_epochs=20).fit(model, datamodule=data)
"""

from __future__ import annotations

from pathlib import Path

from lightning_modules.callbacks import DistributedTeardown, PredictionWriter, TrainingCurves
from lightning_modules.errors import ConfigError
from lightning_modules.data import SKLEARN_DATASETS, CSVDataModule, SklearnDataModule, TableDataModule
from lightning_modules.network import ACTIVATIONS, BACKENDS, build_network, state_dict_for_backend
from lightning_modules.network import SmallCNN  # a CNN for images (digits as 1×8×8)
from lightning_modules.network import SequenceClassifier  # a recurrent layer over sequences (digits as 8 rows)
from lightning_modules.callbacks import DeltaMonitor  # δ per layer while training
from lightning_modules.idx import IDXDataModule, LeNet5, read_idx
from lightning_modules.mnist1d import MNIST1DCNN, MNIST1DGRU, MNIST1DMLP, MNIST1DDataModule
from lightning_modules.tasks import (
    BinaryClassificationTask,
    MulticlassClassificationTask,
    RegressionTask,
    TaskModule,
)

CONFIG_DIR = Path(__file__).parent / "configs"


def config_path(name: str) -> Path:
    """Path of a shipped example config, e.g. config_path("multiclass_digits")."""
    path = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no shipped config {name!r}; the shipped configs are: {', '.join(shipped)}")
    return path


__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "BinaryClassificationTask",
    "CONFIG_DIR",
    "CSVDataModule",
    "DeltaMonitor",
    "ConfigError",
    "DistributedTeardown",
    "IDXDataModule",
    "LeNet5",
    "MNIST1DCNN",
    "MNIST1DDataModule",
    "MNIST1DGRU",
    "MNIST1DMLP",
    "MulticlassClassificationTask",
    "PredictionWriter",
    "RegressionTask",
    "SKLEARN_DATASETS",
    "SklearnDataModule",
    "SequenceClassifier",
    "SmallCNN",
    "TableDataModule",
    "TaskModule",
    "TrainingCurves",
    "build_network",
    "config_path",
    "read_idx",
    "state_dict_for_backend",
]
