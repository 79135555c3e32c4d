"""MNIST and its kin from the files a user already has: the IDX format, read without torchvision.

MNIST, Fashion-MNIST and KMNIST ship as four IDX files (LeCun's format: a magic number whose third
byte names the element type and fourth the number of dimensions, then each dimension as a big-endian
int32, then the elements, big-endian), optionally gzipped:

    train-images-idx3-ubyte   train-labels-idx1-ubyte   t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte

`IDXDataModule(folder)` reads them, keeps the images as uint8 in memory, and gives each as a float
(1, size, size) image: scaled to [0, 1], resized (bilinear, antialiased) when `image_size` is not
28, and normalized by the training split's mean and standard deviation. `LeNet5` is the LeNet
BioTorch benchmarks its learning rules on (32 × 32 input).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_modules.data import check_positive_int, seeded_train_sampler
from lightning_modules.errors import ConfigError, InputFileNotFoundError

# IDX element types: the magic number's third byte -> numpy dtype (big-endian)
IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """The array an IDX file (gzipped or not) holds, in native byte order; errors name the file and the problem."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InputFileNotFoundError(f"IDX file not found: {path}") from None
    except (OSError, EOFError) as error:  # a corrupt gzip stream
        raise ConfigError(f"{path}: cannot read it: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise ConfigError(f"{path} is not an IDX file: its first bytes are {raw[:4].hex() or 'missing'} "
                          f"(expected 00 00, a type code in {sorted(IDX_TYPES)}, the number of dimensions)")
    dtype, ndim = IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"{path}: the header announces {ndim} dimensions but the file ends after {len(raw)} bytes")
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ConfigError(f"{path}: the header announces shape {shape} ({expected} bytes), but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(folder: Path, name: str) -> Path:
    """`name` or `name.gz` in `folder` (also the `-` / `.` spelling some mirrors use)."""
    for candidate in (name, name.replace("-idx", ".idx"), f"{name}.gz", f"{name.replace('-idx', '.idx')}.gz"):
        if (folder / candidate).is_file():
            return folder / candidate
    raise InputFileNotFoundError(f"{folder}: no {name} or {name}.gz (an IDX data folder holds "
                                 f"{', '.join(n for pair in FILES.values() for n in pair)})")


class IDXImages(Dataset):
    """uint8 images (N, H, W) and labels (N,) -> (float (1, size, size) image, int64 label), normalized."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int, mean: float, std: float) -> None:
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
        self.image_size, self.mean, self.std = image_size, mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].to(torch.float32).div_(255).unsqueeze(0)
        if image.shape[-1] != self.image_size or image.shape[-2] != self.image_size:
            image = torch.nn.functional.interpolate(image.unsqueeze(0), size=(self.image_size,) * 2, mode="bilinear",
                                                    align_corners=False, antialias=True).squeeze(0)
        return image.sub_(self.mean).div_(self.std), self.labels[index]


class IDXDataModule(pl.LightningDataModule):
    """MNIST, Fashion-MNIST or KMNIST from a folder of IDX files: 60,000 training and 10,000 test images, 10 classes.

    folder: the folder holding the four files (gzipped or not).
    image_size: the side the 28 × 28 images are resized to (32 for LeNet5, as BioTorch's benchmarks).
    val_fraction: the share of the training images held out (seeded) for validation; 0 trains on all.
    """

    task = "multiclass"

    def __init__(
        self,
        folder: str,
        batch_size: int = 64,
        image_size: int = 28,
        val_fraction: float = 0.0,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        check_positive_int("image_size", image_size)
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"val_fraction must lie in [0, 1); got {val_fraction!r}")
        self.save_hyperparameters()
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputFileNotFoundError(f"IDX data folder not found: {self.folder}")
        self.batch_size, self.image_size, self.val_fraction = batch_size, image_size, val_fraction
        self.seed, self.num_workers = seed, num_workers
        self.arrays = {}
        for split, (images_name, labels_name) in FILES.items():
            images, labels = read_idx(_find(self.folder, images_name)), read_idx(_find(self.folder, labels_name))
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise ConfigError(f"{self.folder}: {split} images {images.shape} and labels {labels.shape} do not "
                                  "pair up (expected (N, H, W) and (N,))")
            self.arrays[split] = (images.astype(np.uint8), labels)
        self.classes = np.unique(np.concatenate([labels for _, labels in self.arrays.values()]))
        if len(self.classes) < 2 or self.classes.min() < 0:
            raise ConfigError(f"{self.folder}: labels must be class indices 0..K−1 of at least 2 classes; got {self.classes.tolist()}")
        train_images = self.arrays["train"][0]
        self.mean = float(train_images.mean() / 255)  # of the training images, as the usual (0.1307, 0.3081) for MNIST
        self.std = float(train_images.std() / 255) or 1.0
        self.splits: dict[str, IDXImages] = {}

    num_targets = 1

    def describe_source(self) -> str:
        return f"IDX images in {self.folder}"

    @property
    def num_features(self) -> int:
        return self.image_size * self.image_size

    @property
    def num_classes(self) -> int:
        return int(self.classes.max()) + 1

    @property
    def target_names(self) -> list[str]:
        return ["label"]

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        images, labels = self.arrays["train"]
        order = np.random.default_rng(self.seed).permutation(len(labels))
        n_val = int(round(self.val_fraction * len(labels)))
        parts = {"train": order[n_val:], "val": order[:n_val]}
        for name, rows in parts.items():
            rows = np.sort(rows)
            self.splits[name] = IDXImages(images[rows], labels[rows], self.image_size, self.mean, self.std)
        self.splits["test"] = IDXImages(*self.arrays["test"], self.image_size, self.mean, self.std)

    def split(self, name: str) -> IDXImages:
        if not self.splits:
            self.setup()
        return self.splits[name]

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", seeded_train_sampler(self.split("train"), self.trainer, self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def _loader(self, split: str, sampler=None) -> DataLoader:
        return DataLoader(self.split(split), batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.folder)!r})"


class LeNet5(torch.nn.Module):
    """LeNet as BioTorch benchmarks it on MNIST: Conv(1→6, 5) → ReLU → MaxPool 2 → Conv(6→16, 5) → ReLU →
    MaxPool 2 → Conv(16→120, 5) → ReLU → Linear(120, 84) → Linear(84, 10). Input: (N, 1, 32, 32)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_channels, 6, 5)
        self.relu1 = torch.nn.ReLU()
        self.pool1 = torch.nn.MaxPool2d(2)
        self.conv2 = torch.nn.Conv2d(6, 16, 5)
        self.relu2 = torch.nn.ReLU()
        self.pool2 = torch.nn.MaxPool2d(2)
        self.conv3 = torch.nn.Conv2d(16, 120, 5)
        self.relu3 = torch.nn.ReLU()
        self.fc1 = torch.nn.Linear(120, 84)
        self.fc2 = torch.nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool1(self.relu1(self.conv1(x)))
        h = self.pool2(self.relu2(self.conv2(h)))
        h = self.relu3(self.conv3(h))
        return self.fc2(self.fc1(h.flatten(1)))
