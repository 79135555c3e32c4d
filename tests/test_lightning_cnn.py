"""Lightning on images: digits as (N, 1, 8, 8), a small CNN through the task's `net`, the shipped CNN config."""

from __future__ import annotations

import sys

import pytest
import torch

import manual_backprop as mb
import manual_backprop.nn as mnn
from lightning_modules import MulticlassClassificationTask, SklearnDataModule, SmallCNN, config_path
from lightning_modules.cli import build_cli

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["manual-backprop"])  # LightningCLI reads sys.argv too


def test_digits_as_images_are_the_scaled_rows_reshaped():
    flat, images = SklearnDataModule("digits"), SklearnDataModule("digits", image_shape=[1, 8, 8])
    assert images.num_features == 64 and images.image_shape == [1, 8, 8]
    for split in ("train", "val", "test"):
        x_flat, y_flat = flat.split(split).tensors
        x_img, y_img = images.split(split).tensors
        assert x_img.shape == (len(x_flat), 1, 8, 8)
        torch.testing.assert_close(x_img.reshape(len(x_img), -1), x_flat)
        assert torch.equal(y_img, y_flat)
    x, _ = next(iter(images.train_dataloader()))
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32


@pytest.mark.parametrize("image_shape", [[1, 8, 7], [2, 8, 8], [1, 0, 64], [1, True, 64]])
def test_image_shape_must_match_the_features(image_shape):
    with pytest.raises(ValueError, match=r"image_shape must be positive integers whose product is the number of features \(64 for digits\)"):
        SklearnDataModule("digits", image_shape=image_shape)


def test_small_cnn_is_conv_relu_pool_and_linear_all_on_our_rules():
    net = SmallCNN(in_channels=1, num_classes=10, channels=[4, 8], image_size=8)
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    report = mb.report(mb.convert(net))
    assert report.stock_parameters == 0 and not report.stock  # Flatten is a view: no rule needed, not stock
    with pytest.raises(ValueError, match="halve image_size=2 below 1 pixel"):
        SmallCNN(image_size=2)


@pytest.mark.parametrize("backend", ["manual", "autograd"])
def test_shipped_cnn_config_fits(tmp_path, backend):
    args = ["fit", "--config", str(config_path("multiclass_digits_cnn")), "--trainer.fast_dev_run=true",
            f"--model.init_args.backend={backend}", f"--trainer.default_root_dir={tmp_path}", *QUIET]
    cli = build_cli(args)
    assert type(cli.model) is MulticlassClassificationTask and cli.datamodule.image_shape == [1, 8, 8]
    assert isinstance(cli.model.net, SmallCNN) and cli.trainer.global_step == 1
    assert type(cli.model.net[0]) is (mnn.Conv2d if backend == "manual" else torch.nn.Conv2d)
    x, y = next(iter(cli.datamodule.train_dataloader()))
    loss = cli.model.loss_fn(cli.model(x), y)
    node = loss.grad_fn
    names = set()
    while node is not None:  # walk the first inputs down to the first layer
        names.add(type(node).__name__)
        node = next((f for f, _ in node.next_functions if f is not None and "AccumulateGrad" not in type(f).__name__), None)
    if backend == "manual":
        assert {"CrossEntropyBackward", "LinearBackward", "MaxPoolBackward", "ConvolutionBackward"} <= names
    else:
        assert "ConvolutionBackward0" in names
