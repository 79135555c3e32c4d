"""convert on the CNNs people use (faithful copies of torchvision's, scripts/zoo_cnn.py): coverage and gradients.

Coverage is the share of parameter elements whose module runs one of our rules after
convert, from `report`; gradients must equal stock autograd's on a small input.
"""

from __future__ import annotations


import pytest
import torch

import manual_backprop as mb
from manual_backprop.testing import assert_grad_parity

from tests.scripts import load_script


@pytest.fixture(scope="module")
def zoo():
    return load_script("zoo_cnn")


@pytest.fixture(autouse=True)
def _one_thread():
    """Batch 2 at 32×32 is too small to share among threads; on a loaded machine threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# torchvision's parameter counts: the copies are the same architectures
PARAMETERS = {"resnet18": 11_689_512, "mobilenet_v3_small": 2_542_856, "efficientnet_b0": 5_288_548, "vgg11": 132_863_336}


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_coverage_at_least_95_percent_and_report_says_why(zoo, name):
    with torch.device("meta"):  # no memory, no init cost: the report needs only the modules
        model = zoo.MODELS[name]()
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]
    report = mb.report(mb.convert(model, inplace=True))
    share = report.manual_parameters / (report.manual_parameters + report.stock_parameters)
    assert share >= 0.95, f"{name}: {100 * share:.2f}% on our rules\n{report}"
    assert all(row.reason for row in report.stock)
    for row in report.stock:  # nothing with a rule of ours stays stock
        assert "is available" not in row.reason, row


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_gradients_equal_stock_float64(zoo, name):
    """Train mode (batch statistics, dropout and stochastic depth drawing the same masks from the same seed)."""
    torch.manual_seed(0)
    model = zoo.MODELS[name](num_classes=10).double().train()
    # batch 4: at 32×32 the last stages are 1×1 maps, so train-mode BatchNorm normalises over the batch
    # alone; over 2 values it is so ill-conditioned (gradients ~1e9) that float64 rounding differs by 1e-4
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 7, 3, 0])
    # atol: a BatchNorm bias followed by a 1×1 convolution and a train-mode BatchNorm has gradient 0 in
    # exact arithmetic; both sides then return cancellation noise (up to ~7e-7 in efficientnet_b0)
    result = assert_grad_parity(model, x, y, torch.nn.CrossEntropyLoss(), rtol=1e-7, atol=1e-5)
    assert result.rule_nodes["ConvolutionBackward"] >= 20


def test_vgg11_features_gradients_equal_stock(zoo):
    """vgg11's convolutional part (features and avgpool, as in the model); its classifier is three
    Linear layers of 120 M parameters that would only make this test slow (test_linear covers Linear)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(zoo.make_layers(zoo.VGG11_CFG), torch.nn.AdaptiveAvgPool2d((7, 7)), torch.nn.Flatten(),
                                torch.nn.Linear(512 * 7 * 7, 10)).double()
    # batch 4: at 32×32 the last stages are 1×1 maps, so train-mode BatchNorm normalises over the batch
    # alone; over 2 values it is so ill-conditioned (gradients ~1e9) that float64 rounding differs by 1e-4
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 7, 3, 0])
    result = assert_grad_parity(model, x, y, torch.nn.CrossEntropyLoss())
    assert result.rule_nodes["ConvolutionBackward"] == 8 and result.rule_nodes["MaxPoolBackward"] == 5
    assert mb.report(mb.convert(model)).row("2").status == "container"  # Flatten: a view, no rule needed
