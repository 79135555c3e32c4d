"""Drop-in modules: same constructor, state_dict, repr and isinstance as torch.nn; our rules inside."""

import inspect

import pytest
import torch

import manual_backprop.functional as MF
import manual_backprop.nn as mnn
from tests.cases import DEVICES, FLOAT32, assert_parity

# (our class, torch class, constructor kwargs, input maker, grad_fn of our rule)
x4 = lambda device: [torch.randn(3, 2, 4, device=device)]  # noqa: E731
regression = lambda device: [torch.randn(5, 3, device=device), torch.randn(5, 3, device=device)]  # noqa: E731
probabilities = lambda device: [torch.rand(5, 3, device=device) * 0.9 + 0.05, torch.rand(5, 3, device=device)]  # noqa: E731
classes = lambda device: [torch.randn(5, 4, device=device), torch.randint(0, 4, (5,), device=device)]  # noqa: E731
indices = lambda device: [torch.tensor([[0, 1, 5], [5, 5, 2]], device=device)]  # noqa: E731

MODULES = [
    (mnn.Linear, torch.nn.Linear, dict(in_features=4, out_features=3), x4, "LinearBackward"),
    (mnn.Linear, torch.nn.Linear, dict(in_features=4, out_features=3, bias=False), x4, "LinearBackward"),
    (mnn.Identity, torch.nn.Identity, {}, x4, None),  # returns its input: no node
    (mnn.Sigmoid, torch.nn.Sigmoid, {}, x4, "SigmoidBackward"),
    (mnn.Tanh, torch.nn.Tanh, {}, x4, "TanhBackward"),
    (mnn.ReLU, torch.nn.ReLU, {}, x4, "ReLUBackward"),
    (mnn.LeakyReLU, torch.nn.LeakyReLU, dict(negative_slope=0.2), x4, "LeakyReLUBackward"),
    (mnn.ELU, torch.nn.ELU, dict(alpha=0.7), x4, "ELUBackward"),
    (mnn.Softplus, torch.nn.Softplus, dict(beta=2.0, threshold=5.0), x4, "SoftplusBackward"),
    (mnn.SiLU, torch.nn.SiLU, {}, x4, "SiLUBackward"),
    (mnn.GELU, torch.nn.GELU, dict(approximate="tanh"), x4, "GELUBackward"),
    (mnn.Softmax, torch.nn.Softmax, dict(dim=1), x4, "SoftmaxBackward"),
    (mnn.MSELoss, torch.nn.MSELoss, dict(reduction="sum"), regression, "MSELossBackward"),
    (mnn.BCELoss, torch.nn.BCELoss, dict(weight=torch.tensor([0.5, 1.0, 2.0])), probabilities, "BinaryCrossEntropyBackward"),
    (mnn.BCEWithLogitsLoss, torch.nn.BCEWithLogitsLoss, dict(pos_weight=torch.tensor([0.5, 1.0, 2.0])), regression, "BinaryCrossEntropyWithLogitsBackward"),
    (mnn.CrossEntropyLoss, torch.nn.CrossEntropyLoss, dict(weight=torch.tensor([1.0, 2.0, 0.5, 1.0]), label_smoothing=0.1), classes, "CrossEntropyBackward"),
    # embedding (MultiheadAttention returns a tuple: its drop-in tests are in tests/test_attention.py)
    (mnn.Embedding, torch.nn.Embedding, dict(num_embeddings=6, embedding_dim=3, padding_idx=1), indices, "EmbeddingBackward"),
]
# norm branch: normalisation and the activations CNNs use (Dropout, random, has its own drop-in test below)
x2 = lambda device: [torch.randn(5, 3, device=device)]  # noqa: E731
x5 = lambda device: [torch.randn(2, 4, 3, 2, 2, device=device)]  # noqa: E731
images = lambda device: [torch.randn(3, 2, 4, 4, device=device)]  # noqa: E731
MODULES += [
    (mnn.BatchNorm1d, torch.nn.BatchNorm1d, dict(num_features=2), x4, "BatchNormBackward"),
    (mnn.BatchNorm1d, torch.nn.BatchNorm1d, dict(num_features=3, momentum=None, affine=False), x2, "BatchNormBackward"),
    (mnn.BatchNorm2d, torch.nn.BatchNorm2d, dict(num_features=2, eps=1e-3), images, "BatchNormBackward"),
    (mnn.BatchNorm3d, torch.nn.BatchNorm3d, dict(num_features=4, track_running_stats=False), x5, "BatchNormBackward"),
    (mnn.LayerNorm, torch.nn.LayerNorm, dict(normalized_shape=4), x4, "LayerNormBackward"),
    (mnn.LayerNorm, torch.nn.LayerNorm, dict(normalized_shape=(2, 4), bias=False), x4, "LayerNormBackward"),
    (mnn.LayerNorm, torch.nn.LayerNorm, dict(normalized_shape=4, elementwise_affine=False), x4, "LayerNormBackward"),
    (mnn.RMSNorm, torch.nn.RMSNorm, dict(normalized_shape=4), x4, "RMSNormBackward"),
    (mnn.RMSNorm, torch.nn.RMSNorm, dict(normalized_shape=(2, 4), eps=1e-3, elementwise_affine=False), x4, "RMSNormBackward"),
    (mnn.GroupNorm, torch.nn.GroupNorm, dict(num_groups=2, num_channels=4), x5, "GroupNormBackward"),
    (mnn.GroupNorm, torch.nn.GroupNorm, dict(num_groups=1, num_channels=2, affine=False), images, "GroupNormBackward"),
    (mnn.ReLU6, torch.nn.ReLU6, {}, lambda d: [torch.randn(3, 2, 4, device=d) * 4], "ReLU6Backward"),
    (mnn.Hardtanh, torch.nn.Hardtanh, dict(min_val=-0.5, max_val=2.0), x4, "HardtanhBackward"),
    (mnn.Hardsigmoid, torch.nn.Hardsigmoid, {}, lambda d: [torch.randn(3, 2, 4, device=d) * 4], "HardsigmoidBackward"),
    (mnn.Hardswish, torch.nn.Hardswish, {}, lambda d: [torch.randn(3, 2, 4, device=d) * 4], "HardswishBackward"),
    (mnn.Mish, torch.nn.Mish, {}, x4, "MishBackward"),
    (mnn.PReLU, torch.nn.PReLU, dict(num_parameters=2, init=0.1), x4, "PReLUBackward"),
    (mnn.PReLU, torch.nn.PReLU, {}, images, "PReLUBackward"),
]

# convolution and pooling
image = lambda *shape: lambda device: [torch.randn(*shape, device=device)]  # noqa: E731
MODULES += [
    (mnn.Conv1d, torch.nn.Conv1d, dict(in_channels=2, out_channels=3, kernel_size=3, padding=1), image(2, 2, 7), "ConvolutionBackward"),
    (mnn.Conv2d, torch.nn.Conv2d, dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, groups=2, bias=False), image(2, 4, 7, 6), "ConvolutionBackward"),
    (mnn.Conv2d, torch.nn.Conv2d, dict(in_channels=2, out_channels=3, kernel_size=3, padding="same", padding_mode="reflect"), image(2, 2, 5, 5), "ConvolutionBackward"),
    (mnn.Conv3d, torch.nn.Conv3d, dict(in_channels=2, out_channels=2, kernel_size=2, padding=1, padding_mode="circular"), image(1, 2, 4, 4, 3), "ConvolutionBackward"),
    (mnn.ConvTranspose1d, torch.nn.ConvTranspose1d, dict(in_channels=2, out_channels=3, kernel_size=3, stride=2), image(2, 2, 5), "ConvTransposeBackward"),
    (mnn.ConvTranspose2d, torch.nn.ConvTranspose2d, dict(in_channels=2, out_channels=4, kernel_size=3, stride=2, output_padding=1, groups=2), image(2, 2, 4, 5), "ConvTransposeBackward"),
    (mnn.ConvTranspose3d, torch.nn.ConvTranspose3d, dict(in_channels=2, out_channels=2, kernel_size=2, dilation=2), image(2, 3, 3, 3), "ConvTransposeBackward"),
    (mnn.MaxPool1d, torch.nn.MaxPool1d, dict(kernel_size=3, stride=2, padding=1), image(2, 3, 9), "MaxPoolBackward"),
    (mnn.MaxPool2d, torch.nn.MaxPool2d, dict(kernel_size=3, stride=2, ceil_mode=True), image(2, 3, 8, 8), "MaxPoolBackward"),
    (mnn.MaxPool3d, torch.nn.MaxPool3d, dict(kernel_size=2, dilation=2), image(1, 2, 5, 5, 5), "MaxPoolBackward"),
    (mnn.AvgPool1d, torch.nn.AvgPool1d, dict(kernel_size=3, padding=1, count_include_pad=False), image(2, 3, 9), "AvgPoolBackward"),
    (mnn.AvgPool2d, torch.nn.AvgPool2d, dict(kernel_size=2, ceil_mode=True, divisor_override=3), image(2, 3, 7, 7), "AvgPoolBackward"),
    (mnn.AvgPool3d, torch.nn.AvgPool3d, dict(kernel_size=2, stride=1), image(1, 2, 4, 4, 4), "AvgPoolBackward"),
    (mnn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool1d, dict(output_size=4), image(2, 3, 9), "AdaptiveAvgPoolBackward"),
    (mnn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool2d, dict(output_size=(1, 1)), image(2, 3, 5, 5), "AdaptiveAvgPoolBackward"),
    (mnn.AdaptiveAvgPool3d, torch.nn.AdaptiveAvgPool3d, dict(output_size=2), image(1, 2, 5, 4, 3), "AdaptiveAvgPoolBackward"),
    (mnn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool1d, dict(output_size=4), image(2, 3, 9), "AdaptiveMaxPoolBackward"),
    (mnn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool2d, dict(output_size=3), image(2, 3, 7, 8), "AdaptiveMaxPoolBackward"),
    (mnn.AdaptiveMaxPool3d, torch.nn.AdaptiveMaxPool3d, dict(output_size=(2, 1, 2)), image(1, 2, 5, 4, 3), "AdaptiveMaxPoolBackward"),
]
IDS = [f"{ours.__name__}-{i}" for i, (ours, *_) in enumerate(MODULES)]


def pair(ours_cls, stock_cls, kwargs, device):
    torch.manual_seed(0)
    stock = stock_cls(**kwargs).to(device)
    torch.manual_seed(0)
    ours = ours_cls(**kwargs).to(device)
    return ours, stock


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ours_cls,stock_cls,kwargs,inputs,grad_fn", MODULES, ids=IDS)
def test_module_parity_and_our_rule_runs(ours_cls, stock_cls, kwargs, inputs, grad_fn, device):
    ours, stock = pair(ours_cls, stock_cls, kwargs, device)
    assert_parity(ours, stock, inputs(device), grad_fn, **FLOAT32)
    if not list(stock.parameters()):
        return
    data = inputs(device)  # parameter gradients too, through a fresh graph
    ours(*data).sum().backward()
    stock(*data).sum().backward()
    for a, b in zip(ours.parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, **FLOAT32)


@pytest.mark.parametrize("ours_cls,stock_cls,kwargs,inputs,grad_fn", MODULES, ids=IDS)
def test_drop_in(ours_cls, stock_cls, kwargs, inputs, grad_fn):
    ours, stock = pair(ours_cls, stock_cls, kwargs, "cpu")
    assert isinstance(ours, stock_cls)
    assert repr(ours) == repr(stock)
    assert list(ours.state_dict()) == list(stock.state_dict())
    ours.load_state_dict(stock.state_dict())  # strict load across the two
    assert inspect.signature(ours_cls.__init__) == inspect.signature(stock_cls.__init__)
    # forward is the only method we override
    overridden = {k for k, v in vars(ours_cls).items() if callable(v) and not k.startswith("__")}
    assert overridden == {"forward"}


@pytest.mark.parametrize("cls", [mnn.ReLU, mnn.LeakyReLU, mnn.ELU, mnn.SiLU, mnn.ReLU6, mnn.Hardtanh, mnn.Hardsigmoid, mnn.Hardswish, mnn.Mish])
def test_inplace_modules(cls):
    stock_cls = getattr(torch.nn, cls.__name__)
    x = torch.randn(4, 3, requires_grad=True)
    z_ours, z_stock = x * 2, x * 2
    out = cls(inplace=True)(z_ours)
    assert out is z_ours and type(out.grad_fn).__name__ == "InplaceElementwiseBackward"
    torch.testing.assert_close(out, stock_cls(inplace=True)(z_stock))


def test_functional_signatures_match_torch():
    import torch.nn.functional as TF

    from torch._jit_internal import boolean_dispatched

    for name in MF.__all__:
        if not hasattr(TF, name):  # torch.lstm & co.: builtins without a signature, called as torch's modules call them
            assert callable(getattr(torch, name)), name
            continue
        ours, stock = getattr(MF, name), getattr(TF, name)
        if stock in boolean_dispatched:  # F.max_pool2d & co. dispatch on return_indices: compare with that variant
            stock = boolean_dispatched[stock]["if_true"]
        try:
            expected = inspect.signature(stock)
        except ValueError:  # a builtin without a signature: read it from the docstring
            doc = stock.__doc__.strip()  # the signature line, which may wrap onto the next lines
            expected = " ".join(line.strip() for line in doc[: doc.index(")") + 1].splitlines())
            assert expected.startswith(f"{name}(")
            params = [p.split("=")[0].strip() for p in expected[len(name) + 1 : expected.index(")")].split(",")]
            assert list(inspect.signature(ours).parameters) == params, name
            continue
        got = inspect.signature(ours)
        assert [(p.name, p.default, p.kind) for p in got.parameters.values()] == [
            (p.name, p.default, p.kind) for p in expected.parameters.values()
        ], name
