"""MNIST-1D (Greydanus, "Scaling down deep learning", arXiv 2011.14439): the data and the authors' models.

MNIST-1D is generated, not downloaded: the `mnist1d` package's `make_dataset` with its default
arguments (5,000 samples of length 40, seed 42) reproduces the published dataset, 4,000 training
rows then 1,000 test rows. `MNIST1DDataModule` generates it once, caches the arrays on disk, keeps
the published test rows as the test split and carves validation from the training rows.

The models are the authors' (their `notebooks/models.py`), layer for layer and parameter for
parameter, as stock torch modules: a task with backend "manual" converts them to our rules.

    model        parameters   published test accuracy (their notebook, 6,000 steps of Adam 1e-2, batch 100)
    logistic     410          32 %  (31.5)
    MNIST1DMLP   15,210       68 %  (65.1)
    MNIST1DCNN   5,210        94 %  (92.3)
    MNIST1DGRU   5,134        91 %  (89.1)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from lightning_modules.data import TableDataModule
from lightning_modules.errors import ConfigError

LENGTH, CLASSES, TRAIN_ROWS, TEST_ROWS = 40, 10, 4000, 1000


def default_cache_dir() -> Path:
    """$MANUAL_BACKPROP_CACHE, else $XDG_CACHE_HOME/manual_backprop, else ~/.cache/manual_backprop."""
    if os.environ.get("MANUAL_BACKPROP_CACHE"):
        return Path(os.environ["MANUAL_BACKPROP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "manual_backprop"


def generate(cache_dir: Optional[Union[str, os.PathLike]] = None) -> dict[str, np.ndarray]:
    """The published MNIST-1D arrays {"x", "y", "x_test", "y_test"}, generated once and cached as .npz.

    The generator seeds numpy's and Python's global random generators; their states are restored
    afterwards, so generating the data changes no other randomness of the caller.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=True)
    args.pop("url")  # never downloaded
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir or default_cache_dir()) / f"mnist1d_{key}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return {name: cached[name] for name in ("x", "y", "x_test", "y_test")}
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    arrays = {name: np.asarray(data[name]) for name in ("x", "y", "x_test", "y_test")}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)  # atomic: an interrupted run never leaves a truncated cache behind
    return arrays


class MNIST1DDataModule(TableDataModule):
    """MNIST-1D's 5,000 rows of length 40, 10 classes: the published 4,000 training and 1,000 test rows.

    val_fraction: the share of the 4,000 training rows held out (stratified, seeded) for validation;
        0 trains on all 4,000, as the authors did (validation then has no batches).
    shape: each row's features in this shape: [40] for the MLP and logistic regression (default),
        [1, 40] (channels, length) for the CNN, [40, 1] (time, features) for the GRU.
    standardize: off by default: the generator already centres the data and scales it to std 1
        as a whole, and the published figures use it so.
    cache_dir: where the generated arrays are kept (default: `default_cache_dir()`).
    sampling: "auto" (default: Poisson sampling for a private task, shuffled batches otherwise), "poisson",
        or "shuffle": fixed-size shuffled batches even for DP-SGD, whose ε then assumes Poisson sampling
        it did not get (an approximation the accountant does not cover).
    """

    def __init__(
        self,
        batch_size: int = 100,
        val_fraction: float = 0.1,
        shape: Optional[list[int]] = None,
        seed: int = 42,
        standardize: bool = False,
        num_workers: int = 0,
        cache_dir: Optional[str] = None,
        sampling: str = "auto",
    ) -> None:
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"val_fraction must lie in [0, 1) (a share of the 4000 training rows); got {val_fraction!r}")
        # the base class checks fractions of a table it splits itself; `setup` uses the published split instead
        super().__init__("multiclass", batch_size, 0.1, TEST_ROWS / (TRAIN_ROWS + TEST_ROWS), seed, standardize, num_workers,
                         sampling)
        self.save_hyperparameters()
        self.val_fraction = val_fraction
        shape = [LENGTH] if shape is None else list(shape)
        if any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in shape) or int(np.prod(shape)) != LENGTH:
            raise ConfigError(f"shape must be positive integers whose product is {LENGTH}, e.g. [40], [1, 40] or [40, 1]; got {shape}")
        self.image_shape = shape if len(shape) > 1 else None
        arrays = generate(cache_dir)
        self.set_table(np.concatenate([arrays["x"], arrays["x_test"]]), np.concatenate([arrays["y"], arrays["y_test"]]),
                       describe=lambda i: f"MNIST-1D row {i + 1}")

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        train = np.arange(TRAIN_ROWS)
        val = np.empty(0, dtype=np.int64)
        if self.val_fraction > 0:
            train, val = train_test_split(train, test_size=self.val_fraction, random_state=self.seed,
                                          stratify=self.targets[train])
        self.rows = {"train": train + 1, "val": val + 1, "test": np.arange(TRAIN_ROWS, TRAIN_ROWS + TEST_ROWS) + 1}
        if self.standardize and self.feature_mean is None:
            self.feature_mean = self.features[train].mean(0)
            self.feature_scale = self.features[train].std(0)
        self._build_splits()

    def check_split_sizes(self) -> None:
        """The published split is fixed: nothing to check against the fractions."""

    def describe_source(self) -> str:
        return "MNIST-1D"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.image_shape or [LENGTH]})"


# ------------------------------------------------------------------ the authors' models


class MNIST1DMLP(torch.nn.Module):
    """Linear(40, 100) → ReLU, then a residual Linear(100, 100) → ReLU, then Linear(100, 10): 15,210 parameters."""

    def __init__(self, input_size: int = LENGTH, num_classes: int = CLASSES, hidden_size: int = 100) -> None:
        super().__init__()
        self.linear1 = torch.nn.Linear(input_size, hidden_size)
        self.linear2 = torch.nn.Linear(hidden_size, hidden_size)
        self.linear3 = torch.nn.Linear(hidden_size, num_classes)
        self.relu = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.linear1(x))
        h = h + self.relu(self.linear2(h))
        return self.linear3(h)


class MNIST1DCNN(torch.nn.Module):
    """Three Conv1d (25 channels; kernels 5, 3, 3; stride 2, padding 1) with ReLU, then Linear(125, 10): 5,210 parameters.

    Input: (N, 1, 40) or (N, 40).
    """

    def __init__(self, num_classes: int = CLASSES, channels: int = 25, length: int = LENGTH) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = torch.nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = torch.nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        for _ in range(3):  # each convolution: ⌊(L + 2 − k) / 2⌋ + 1
            length = (length + 2 - (5 if _ == 0 else 3)) // 2 + 1
        self.relu = torch.nn.ReLU()
        self.linear = torch.nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 1, x.shape[-1])
        for conv in (self.conv1, self.conv2, self.conv3):
            h = self.relu(conv(h))
        return self.linear(h.flatten(1))


class MNIST1DGRU(torch.nn.Module):
    """A bidirectional GRU (hidden size 6) over the 40 steps, every step's output flattened into Linear(480, 10):
    5,134 parameters. Input: (N, 40, 1) or (N, 40)."""

    def __init__(self, num_classes: int = CLASSES, hidden_size: int = 6, length: int = LENGTH,
                 bidirectional: bool = True) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(1, hidden_size, batch_first=True, bidirectional=bidirectional)
        self.linear = torch.nn.Linear((2 if bidirectional else 1) * hidden_size * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.gru(x.reshape(x.shape[0], -1, 1))
        return self.linear(output.flatten(1))
