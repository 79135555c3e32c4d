"""IDX files (MNIST, Fashion-MNIST, KMNIST) read without torchvision, on small files the tests write."""

from __future__ import annotations

import gzip
import struct
import sys

import numpy as np
import pytest
import torch

import manual_backprop as mb
from lightning_modules import ConfigError, IDXDataModule, LeNet5, TrainingCurves, config_path, read_idx
from lightning_modules.cli import build_cli
from lightning_modules.errors import InputFileNotFoundError
from manual_backprop.testing import rule_nodes

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """What LeCun's format stores: 0, 0, the type code, the number of dimensions, each dimension, the data (big-endian)."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_mnist(folder, n_train=40, n_test=20, size=28, gz=False, seed=0):
    """A folder of the four MNIST files with random digits: labels cycle through 0..9."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, array, code in (("images-idx3", images, 0x08), ("labels-idx1", labels, 0x08)):
            name = folder / f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array, code)
            if gz:
                with gzip.open(f"{name}.gz", "wb") as f:
                    f.write(data)
            else:
                name.write_bytes(data)
    return folder


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["manual-backprop"])


@pytest.mark.parametrize("code, dtype", [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32),
                                         (0x0D, np.float32), (0x0E, np.float64)])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_read_idx_round_trips_every_element_type(tmp_path, code, dtype, gz):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    data = idx_bytes(array, code)
    path.write_bytes(gzip.compress(data) if gz else data)
    read = read_idx(path)
    assert read.shape == (2, 3, 4) and read.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(read, array)


@pytest.mark.parametrize("data, message", [
    (b"\x01\x00\x08\x01", r"not an IDX file: its first bytes are 01000801"),
    (bytes([0, 0, 8, 2]) + struct.pack(">i", 3), r"announces 2 dimensions but the file ends after 8 bytes"),
    (bytes([0, 0, 8, 1]) + struct.pack(">i", 5) + b"abc", r"announces shape \(5,\) \(13 bytes\), but the file has 11 bytes"),
])
def test_a_bad_idx_file_is_named_with_what_is_wrong(tmp_path, data, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=message):
        read_idx(path)
    with pytest.raises(InputFileNotFoundError, match="IDX file not found"):
        read_idx(tmp_path / "missing")


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_data_module_gives_normalized_32x32_images_and_labels(tmp_path, gz):
    folder = write_mnist(tmp_path / "mnist", gz=gz)
    data = IDXDataModule(str(folder), batch_size=8, image_size=32, val_fraction=0.25)
    assert (data.num_features, data.num_classes, data.task) == (32 * 32, 10, "multiclass")
    assert (len(data.split("train")), len(data.split("val")), len(data.split("test"))) == (30, 10, 20)
    x, y = next(iter(data.test_dataloader()))
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32 and y.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    raw = read_idx(next(folder.glob("train-images*"))).astype(np.float64) / 255
    assert data.mean == pytest.approx(raw.mean()) and data.std == pytest.approx(raw.std())
    native = IDXDataModule(str(folder), image_size=28)
    image, _ = native.split("test")[0]
    test_raw = read_idx(next(folder.glob("t10k-images*")))[0].astype(np.float64) / 255
    np.testing.assert_allclose(image[0].numpy(), (test_raw - native.mean) / native.std, rtol=1e-5, atol=1e-5)


def test_missing_folder_or_file_is_named(tmp_path):
    with pytest.raises(InputFileNotFoundError, match="IDX data folder not found"):
        IDXDataModule(str(tmp_path / "nowhere"))
    folder = write_mnist(tmp_path / "mnist")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(InputFileNotFoundError, match=r"no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz"):
        IDXDataModule(str(folder))


def test_lenet5_runs_on_our_rules_equal_to_stock():
    model = LeNet5().double()
    x = torch.randn(3, 1, 32, 32, dtype=torch.float64)
    result = mb.testing.assert_grad_parity(model, x, torch.tensor([1, 2, 3]), torch.nn.CrossEntropyLoss(),
                                           rtol=1e-10, atol=1e-12)
    assert result.conversion.stock_parameters == 0


RULES = {"backprop": "backprop", "fa": "feedback_alignment", "dfa": "direct_feedback_alignment",
         "usf": "sign_symmetry", "brsf": "batchwise_random_sign_symmetry", "frsf": "fixed_random_sign_symmetry"}


@pytest.mark.parametrize("rule", list(RULES))
def test_every_lenet_config_trains_on_a_folder_of_idx_files(tmp_path, rule):
    folder = write_mnist(tmp_path / "mnist", gz=True)
    args = ["fit", "--config", str(config_path(f"mnist_lenet_{rule}")), f"--data.init_args.folder={folder}",
            "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}"]
    cli = build_cli(args + QUIET)
    assert cli.trainer.global_step == 2
    assert type(cli.trainer.optimizers[0]) is torch.optim.SGD and cli.trainer.optimizers[0].defaults["momentum"] == 0.9
    assert cli.model.hparams["learning_rule"] == RULES[rule]
    registry = mb.default_registry() if rule == "backprop" else mb.default_registry().rule_set(RULES[rule])
    for name in ("conv1", "conv3", "fc1", "fc2"):  # each layer converted by the config's learning rule
        layer = getattr(cli.model.net, name)
        assert registry.rule_of_manual(type(layer)) is not None, (name, type(layer))
    assert mb.report(cli.model.net).stock_parameters == 0
    x, _ = next(iter(cli.datamodule.train_dataloader()))
    assert x.shape[1:] == (1, 32, 32)
    assert rule_nodes(cli.model(x).sum())
    how = "backend manual" + ("" if rule == "backprop" else f", learning rule {RULES[rule]}")
    assert TrainingCurves._title(cli.trainer, cli.model) == f"MulticlassClassificationTask: LeNet5 on IDX images in {folder}\n{how}"
