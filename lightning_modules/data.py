"""Data modules over in-memory tables: scikit-learn's bundled datasets, or a user's CSV.

Both read their data in `__init__` (small tables), so bad input fails before any
training starts and `num_features` / `num_targets` / `num_classes` are known before
`setup`, which lets the CLI link them into the model. `setup` splits the rows into
train / validation / test (stratified by class for classification) and fits the
feature scaler, and for regression the target scaler, on the training split only.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn import datasets as sklearn_datasets
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

from lightning_modules.errors import ConfigError, InputFileNotFoundError

TASKS = ("regression", "binary", "multiclass")
# How training batches are drawn: "auto" is "poisson" for a model that trains privately (DP-SGD), else "shuffle".
SAMPLINGS = ("auto", "shuffle", "poisson")
SAMPLING_HELP = (
    "sampling: 'shuffle' deals each epoch's shuffled rows into batches of batch_size; 'poisson' draws each "
    "batch by taking every row independently with probability q = 1 / (batches per epoch), as DP-SGD's "
    "privacy accounting assumes (batch sizes vary, a batch may be empty); 'auto' (default) is 'poisson' for "
    "a task with dp_noise_multiplier set and 'shuffle' otherwise. Private training with 'shuffle' counts ε "
    "as if it were Poisson: an approximation the accountant does not cover."
)


class PoissonBatches(IterableDataset):
    """Poisson sampling: `num_batches` batches an epoch, each holding every row independently with
    probability q = 1 / num_batches (Opacus's `DPDataLoader`; Abadi et al.'s accounting assumes it).

    A batch holds len(dataset) · q rows on average (`expected_batch_size`, over every process) and may be
    empty: its tensors then have 0 rows. On N processes each samples its own rows (r, r + N, ...), so the
    global batch is Poisson-sampled too. The draws are seeded by (seed, epoch, rank): a run resumed from a
    checkpoint sees the same batches. num_batches = ⌈rows / (batch_size · N)⌉, as the shuffled mode has.
    """

    def __init__(self, dataset: TensorDataset, batch_size: int, seed: int, epoch: Callable[[], int],
                 num_replicas: int = 1, rank: int = 0) -> None:
        self.dataset, self.seed, self.epoch, self.rank = dataset, seed, epoch, rank
        n = len(dataset)
        self.num_batches = max(1, math.ceil(n / (batch_size * num_replicas)))
        self.sample_rate = 1.0 / self.num_batches
        self.expected_batch_size = n * self.sample_rate
        self.rows = torch.arange(rank, n, num_replicas)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch()) * 1_009 + self.rank)
        for _ in range(self.num_batches):
            taken = self.rows[torch.rand(len(self.rows), generator=generator) < self.sample_rate]
            yield tuple(t[taken] for t in self.dataset.tensors)


def trains_privately(trainer: Optional[pl.Trainer]) -> bool:
    """Whether the trainer's model trains with DP-SGD (a task with dp_noise_multiplier set)."""
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    hparams = getattr(module, "hparams", {}) if module is not None else {}
    return hparams.get("dp_noise_multiplier") is not None


def check_positive_int(name: str, value) -> int:
    """A ConfigError naming `name` unless `value` is a positive int (bool is an int in Python: refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")
    return value


def check_sampling(sampling: str) -> str:
    if sampling not in SAMPLINGS:
        raise ConfigError(f"sampling must be one of {', '.join(map(repr, SAMPLINGS))}; got {sampling!r}")
    return sampling


def seeded_train_sampler(dataset, trainer: Optional[pl.Trainer], seed: int) -> DistributedSampler:
    """The training rows' order: a DistributedSampler even on one process.

    Its shuffle is seeded by (seed, epoch), so a run resumed from a checkpoint sees the same batches
    as an uninterrupted one, and on N processes with batch B the global batches equal one process
    with batch N·B.
    """
    replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    return DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed)


class TableDataModule(pl.LightningDataModule):
    """Features X (n, d) and targets y, split and standardized; the shared part of the data modules.

    Training batches: see `SAMPLING_HELP` (the `sampling` argument).
    Targets in batches: regression float (B, u), standardized when `standardize`;
    binary float (B,) in {0, 1}; multi-class int64 (B,) in [0, K).
    Features in batches: float (B, d), or (B, *image_shape) when `image_shape` is set.
    """

    image_shape: Optional[list[int]] = None  # features as images, e.g. [1, 8, 8]: see SklearnDataModule

    def __init__(
        self,
        task: str,
        batch_size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 42,
        standardize: bool = True,
        num_workers: int = 0,
        sampling: str = "auto",
    ) -> None:
        super().__init__()
        self.sampling = check_sampling(sampling)
        if task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(map(repr, TASKS))}; got {task!r}")
        check_positive_int("batch_size", batch_size)
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < fraction < 1:
                raise ConfigError(f"{name} must lie strictly between 0 and 1; got {fraction!r}")
        if val_fraction + test_fraction >= 1:
            raise ConfigError(
                f"val_fraction + test_fraction must leave rows to train on; got {val_fraction} + {test_fraction} >= 1"
            )
        self.task = task
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.standardize = standardize
        self.num_workers = num_workers
        self.features = np.empty((0, 0), dtype=np.float64)
        self.targets = np.empty((0,), dtype=np.float64)
        self.classes: Optional[np.ndarray] = None  # original labels; column j of predictions is classes[j]
        self.feature_mean: Optional[np.ndarray] = None  # the scalers, fitted on the training split
        self.feature_scale: Optional[np.ndarray] = None
        self.target_mean: Optional[np.ndarray] = None
        self.target_scale: Optional[np.ndarray] = None
        self.splits: dict[str, TensorDataset] = {}
        self.rows: dict[str, np.ndarray] = {}  # split -> its rows' numbers in the table (1 = first row)
        self.target_names: list[str] = []  # column names for predictions.csv (set by the subclasses)

    # -------------------------------------------------------------- shapes

    @property
    def num_features(self) -> int:
        return self.features.shape[1]

    @property
    def num_targets(self) -> int:
        """Target columns: u for regression, 1 for classification."""
        return self.targets.shape[1] if self.targets.ndim == 2 else 1

    @property
    def num_classes(self) -> Optional[int]:
        """K for classification (2 for binary); None for regression."""
        return None if self.classes is None else len(self.classes)

    def set_table(self, features: np.ndarray, targets: np.ndarray, describe: Callable[[int], str]) -> None:
        """Check the targets fit `task` and store the table. `describe(i)` names row i in errors."""
        features = np.asarray(features, dtype=np.float64)
        targets = np.asarray(targets, dtype=np.float64)
        if self.task == "regression":
            self.targets = targets.reshape(len(targets), -1)
        else:
            if targets.ndim == 2 and targets.shape[1] != 1:
                raise ConfigError(f"{self.task} classification takes one target column; got {targets.shape[1]}")
            targets = targets.reshape(-1)
            if self.task == "binary":
                bad = np.flatnonzero((targets != 0) & (targets != 1))
                if len(bad):
                    raise ConfigError(
                        f"binary targets must be 0 or 1; {describe(bad[0])} holds {targets[bad[0]]:g} "
                        f"({len(bad)} such rows)"
                    )
                if len(np.unique(targets)) < 2:
                    raise ConfigError(
                        f"binary targets hold only the value {targets[0]:g} in all {len(targets)} rows: a classifier "
                        "needs rows of both classes 0 and 1 (otherwise it reports a perfect accuracy for nothing)"
                    )
                self.classes = np.array([0, 1])
                self.targets = targets
            else:
                bad = np.flatnonzero(targets != np.round(targets))
                if len(bad):
                    raise ConfigError(
                        f"multiclass labels must be integers; {describe(bad[0])} holds {targets[bad[0]]:g} "
                        f"({len(bad)} such rows)"
                    )
                # Any integer labels (e.g. 1..K or −1/1) become class indices 0..K−1, in sorted order.
                self.classes, self.targets = np.unique(targets.astype(np.int64), return_inverse=True)
                if len(self.classes) < 2:
                    raise ConfigError(f"multiclass labels take at least 2 values; got only {self.classes.tolist()}")
        self.features = features
        self.check_split_sizes()  # now, not at setup: bad input fails before a Trainer exists

    # -------------------------------------------------------------- splits

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:  # once: every stage sees the same split and scalers
            return
        rows = np.arange(len(self.features))
        stratify = None if self.task == "regression" else self.targets
        try:
            train_val, test = train_test_split(rows, test_size=self.test_fraction, random_state=self.seed, stratify=stratify)
            stratify = None if stratify is None else self.targets[train_val]
            train, val = train_test_split(
                train_val,
                test_size=self.val_fraction / (1 - self.test_fraction),
                random_state=self.seed,
                stratify=stratify,
            )
        except ValueError as error:  # a corner check_split_sizes does not foresee: still the user's table
            raise ConfigError(f"{self.describe_source()}: cannot split {len(rows)} rows into train / val / test: {error}") from None
        self.rows = {"train": train + 1, "val": val + 1, "test": test + 1}
        if self.standardize and self.feature_mean is None:  # not already restored from a checkpoint
            scaler = StandardScaler().fit(self.features[train])
            self.feature_mean, self.feature_scale = scaler.mean_, scaler.scale_
            if self.task == "regression":
                target_scaler = StandardScaler().fit(self.targets[train])
                self.target_mean, self.target_scale = target_scaler.mean_, target_scaler.scale_
        self._build_splits()

    def _build_splits(self) -> None:
        x, y = self.scale_features(self.features), self.targets
        if self.target_mean is not None:
            y = (y - self.target_mean) / self.target_scale
        y_dtype = torch.int64 if self.task == "multiclass" else torch.float32
        shape = (-1, *self.image_shape) if self.image_shape else (-1, x.shape[1])  # images: after scaling each pixel
        for name, rows in self.rows.items():
            index = rows - 1
            self.splits[name] = TensorDataset(
                torch.as_tensor(x[index], dtype=torch.float32).reshape(shape), torch.as_tensor(y[index], dtype=y_dtype)
            )

    def scale_features(self, features: np.ndarray) -> np.ndarray:
        """Features standardized with the training split's scaler (as they are, without `standardize`)."""
        if self.feature_mean is None:
            return features
        return (features - self.feature_mean) / self.feature_scale

    def check_split_sizes(self) -> None:
        """Refuse a table too small for the train / val / test split, saying how many rows it needs."""
        n = len(self.features)
        per_split = 1 if self.task == "regression" else len(self.classes)  # stratified: one row of each class
        smallest = min(self.split_sizes(n))
        if smallest >= per_split and (self.task == "regression" or np.bincount(self.targets.astype(np.int64)).min() >= 3):
            return
        needed = next(m for m in range(1, 100_000) if min(self.split_sizes(m)) >= per_split)
        what = "a row" if self.task == "regression" else f"a row of each of the {per_split} classes (stratified)"
        message = (
            f"{self.describe_source()} has {n} rows, too few to split into train / val / test with "
            f"val_fraction={self.val_fraction} and test_fraction={self.test_fraction}: each split needs {what}, "
            f"which takes at least {needed} rows"
        )
        if self.task != "regression":
            counts = np.bincount(self.targets.astype(np.int64), minlength=len(self.classes))
            label, count = self.classes[counts.argmin()], counts.min()
            if count < 3:
                message += f", and at least 3 rows of each class (class {label} has {count})"
        raise ConfigError(message + "; add rows or raise the fractions")

    def split_sizes(self, n: int) -> tuple[int, int, int]:
        """(train, val, test) row counts for n rows, as scikit-learn's train_test_split rounds them."""
        test = math.ceil(self.test_fraction * n)
        val = math.ceil(self.val_fraction / (1 - self.test_fraction) * (n - test))
        return n - test - val, val, test

    def describe_source(self) -> str:
        return type(self).__name__

    # -------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """The fitted scalers and class labels, as plain lists: saved in checkpoints (weights_only loads them),
        so test and predict from a checkpoint transform rows exactly as the training run did."""
        plain = {
            name: getattr(self, name).tolist()
            for name in ("feature_mean", "feature_scale", "target_mean", "target_scale", "classes")
            if getattr(self, name) is not None
        }
        return plain

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the checkpoint's scalers (Lightning calls this after `setup`: the splits are rebuilt)."""
        if "feature_mean" in state_dict and len(state_dict["feature_mean"]) != self.num_features:
            raise ConfigError(
                f"the checkpoint's feature scaler has {len(state_dict['feature_mean'])} features, "
                f"but {self.describe_source()} has {self.num_features}"
            )
        for name in ("feature_mean", "feature_scale", "target_mean", "target_scale"):
            if name in state_dict:
                setattr(self, name, np.asarray(state_dict[name], dtype=np.float64))
        if "classes" in state_dict and self.classes is not None:
            saved = np.asarray(state_dict["classes"])
            if saved.shape != self.classes.shape or not np.array_equal(saved, self.classes):
                raise ConfigError(
                    f"the checkpoint was trained on classes {saved.tolist()}, "
                    f"but {self.describe_source()} holds classes {self.classes.tolist()}"
                )
        if self.rows:
            self._build_splits()

    def train_dataloader(self) -> DataLoader:
        if self.sampling == "poisson" or (self.sampling == "auto" and trains_privately(self.trainer)):
            trainer = self.trainer
            replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            epoch = (lambda: trainer.current_epoch) if trainer is not None else (lambda: 0)
            batches = PoissonBatches(self.split("train"), self.batch_size, self.seed, epoch, replicas, rank)
            return DataLoader(batches, batch_size=None)  # whole batches, in this process (the draws are cheap)
        return self._loader("train", sampler=seeded_train_sampler(self.split("train"), self.trainer, self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split's rows, in `predict_rows()` order."""
        return self._loader("test")

    def predict_rows(self) -> np.ndarray:
        """Row numbers (1 = the table's first row) of what `predict_dataloader` yields, in order."""
        return self.rows["test"]

    def split(self, name: str) -> TensorDataset:
        """The "train", "val" or "test" rows (splitting first if `setup` has not run)."""
        if not self.splits:
            self.setup()
        return self.splits[name]

    def _loader(self, split: str, sampler: Optional[DistributedSampler] = None) -> DataLoader:
        return DataLoader(
            self.split(split),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


# name -> (task, loader). All ship inside scikit-learn: nothing is downloaded.
SKLEARN_DATASETS: dict[str, tuple[str, Callable]] = {
    "diabetes": ("regression", sklearn_datasets.load_diabetes),
    "linnerud": ("regression", sklearn_datasets.load_linnerud),
    "breast_cancer": ("binary", sklearn_datasets.load_breast_cancer),
    "iris": ("multiclass", sklearn_datasets.load_iris),
    "wine": ("multiclass", sklearn_datasets.load_wine),
    "digits": ("multiclass", sklearn_datasets.load_digits),
}


class SklearnDataModule(TableDataModule):
    """One of scikit-learn's bundled datasets; the task (regression / binary / multiclass) follows from it.

    diabetes (442 × 10 → 1), linnerud (20 × 3 → 3), breast_cancer (569 × 30 → {0, 1}),
    iris (150 × 4 → 3 classes), wine (178 × 13 → 3 classes), digits (1797 × 64 → 10 classes).

    image_shape: give each row's features as an image of this shape, e.g. [1, 8, 8] for digits
    (channels, height, width; the product must equal the number of features), for a CNN.

    sampling: "auto" (default: Poisson sampling for a private task, shuffled batches otherwise), "poisson",
        or "shuffle": fixed-size shuffled batches even for DP-SGD, whose ε then assumes Poisson sampling
        it did not get (an approximation the accountant does not cover). See `SAMPLING_HELP`.
    """

    def __init__(
        self,
        dataset: str,
        batch_size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 42,
        standardize: bool = True,
        num_workers: int = 0,
        image_shape: Optional[list[int]] = None,
        sampling: str = "auto",
    ) -> None:
        if dataset not in SKLEARN_DATASETS:
            raise ConfigError(f"unknown dataset {dataset!r}; choose one of: {', '.join(SKLEARN_DATASETS)}")
        task, load = SKLEARN_DATASETS[dataset]
        super().__init__(task, batch_size, val_fraction, test_fraction, seed, standardize, num_workers, sampling)
        self.save_hyperparameters()
        self.dataset = dataset
        bunch = load()
        self.set_table(bunch.data, bunch.target, describe=lambda i: f"{dataset}: row {i + 1}")
        if image_shape is not None:
            image_shape = list(image_shape)
            if any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in image_shape) or \
                    math.prod(image_shape) != self.num_features:
                raise ConfigError(f"image_shape must be positive integers whose product is the number of features "
                                 f"({self.num_features} for {dataset}); got {image_shape}")
            self.image_shape = image_shape
        names = [str(name) for name in getattr(bunch, "target_names", [])] if task == "regression" else []
        if len(names) != self.num_targets:  # diabetes has none; iris' target_names are its classes
            names = ["target"] if self.num_targets == 1 else [f"target_{j}" for j in range(self.num_targets)]
        self.target_names = names

    def describe_source(self) -> str:
        return f"scikit-learn's {self.dataset} data"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dataset!r})"


class CSVDataModule(TableDataModule):
    """A numeric CSV with a header row: `target_columns` are the targets, the other
    columns (or `feature_columns`) the features.

    task: "regression" (any number of target columns), "binary" (one column of 0/1)
    or "multiclass" (one column of integer labels; sorted labels become classes 0..K−1,
    kept in `classes`).

    predict_path: a CSV to predict on instead of the test split (`manual-backprop predict`);
    it needs the feature columns, not the targets, and is scaled with the training scalers.

    sampling: "auto" (default: Poisson sampling for a private task, shuffled batches otherwise), "poisson",
        or "shuffle": fixed-size shuffled batches even for DP-SGD, whose ε then assumes Poisson sampling
        it did not get (an approximation the accountant does not cover). See `SAMPLING_HELP`.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        target_columns: Union[str, Sequence[str]],
        task: str = "regression",
        feature_columns: Optional[Sequence[str]] = None,
        batch_size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 42,
        standardize: bool = True,
        num_workers: int = 0,
        predict_path: Optional[Union[str, os.PathLike]] = None,
        sampling: str = "auto",
    ) -> None:
        super().__init__(task, batch_size, val_fraction, test_fraction, seed, standardize, num_workers, sampling)
        # Plain values, so hparams and checkpoints hold no Path or tuple.
        path = str(path)
        predict_path = None if predict_path is None else str(predict_path)
        target_columns = [target_columns] if isinstance(target_columns, str) else list(target_columns)
        feature_columns = None if feature_columns is None else list(feature_columns)
        self.save_hyperparameters()
        self.path = Path(path)
        header, rows, lines = read_numeric_csv(self.path)
        if not target_columns:
            raise ConfigError("target_columns must name at least one column")
        missing = [c for c in target_columns + (feature_columns or []) if c not in header]
        if missing:
            raise ConfigError(f"{self.path}: no column {missing[0]!r}; the columns are: {', '.join(header)}")
        if feature_columns is None:
            feature_columns = [c for c in header if c not in target_columns]
        if not feature_columns:
            raise ConfigError(f"{self.path}: no feature columns left once the targets {target_columns} are taken")
        self.target_columns, self.feature_columns = target_columns, feature_columns
        table = np.array(rows, dtype=np.float64)
        column = {name: j for j, name in enumerate(header)}
        self.set_table(
            table[:, [column[c] for c in feature_columns]],
            table[:, [column[c] for c in target_columns]],
            describe=lambda i: f"{self.path}: row {i + 1} (line {lines[i]}), column {target_columns[0]!r}",
        )
        self.target_names = list(target_columns)
        self.predict_path = None if predict_path is None else Path(predict_path)
        if self.predict_path is not None and not self.predict_path.exists():
            raise InputFileNotFoundError(f"CSV file to predict on not found: {self.predict_path}")

    def describe_source(self) -> str:
        return str(self.path)

    def predict_dataloader(self) -> DataLoader:
        """The rows of `predict_path` (targets not needed), or without one the test split."""
        if self.predict_path is None:
            return super().predict_dataloader()
        header, rows, _ = read_numeric_csv(self.predict_path)
        missing = [c for c in self.feature_columns if c not in header]
        if missing:
            raise ConfigError(
                f"{self.predict_path}: no feature column {missing[0]!r} (the model was trained on "
                f"{', '.join(self.feature_columns)}); its columns are: {', '.join(header)}"
            )
        table = np.array(rows, dtype=np.float64)
        x = self.scale_features(table[:, [header.index(c) for c in self.feature_columns]])
        self._predict_rows = np.arange(1, len(rows) + 1)
        return DataLoader(TensorDataset(torch.as_tensor(x, dtype=torch.float32)), batch_size=self.batch_size)

    def predict_rows(self) -> np.ndarray:
        return self._predict_rows if self.predict_path is not None else super().predict_rows()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def read_numeric_csv(path: Path) -> tuple[list[str], list[list[float]], list[int]]:
    """Header, rows of finite numbers and each row's line in the file; errors name the file, row, line and column."""
    if not path.exists():
        raise InputFileNotFoundError(f"CSV file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{path} is not a file")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise ConfigError(f"{path} is empty: expected a header row of column names, then rows of numbers")
        header = [name.strip() for name in header]
        duplicates = sorted({name for name in header if header.count(name) > 1})
        if duplicates:
            raise ConfigError(f"{path}: duplicate column names {duplicates}")
        rows, lines = [], []
        for cells in reader:
            line = reader.line_num
            if not cells or not any(cell.strip() for cell in cells):
                continue  # blank lines, e.g. a trailing newline
            i = len(rows) + 1
            if len(cells) != len(header):
                raise ConfigError(f"{path}: row {i} (line {line}) has {len(cells)} cells; the header has {len(header)}")
            row = []
            for name, cell in zip(header, cells):
                where = f"{path}: row {i} (line {line}), column {name!r}"
                try:
                    value = float(cell)
                except ValueError:
                    raise ConfigError(f"{where} holds {cell!r}, which is not a number") from None
                if not math.isfinite(value):
                    raise ConfigError(f"{where} holds {cell.strip()!r}; NaN and infinite values are not allowed")
                row.append(value)
            rows.append(row)
            lines.append(line)
    if not rows:
        raise ConfigError(f"{path} has a header but no data rows")
    return header, rows, lines
