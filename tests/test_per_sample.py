"""Per-sample gradients and norms: `per_sample_grads` against torch.func's vmap(grad(per-sample loss)).

Every case is data: a stock model (the reference runs it under vmap), its input and target, and how
the loss reduces. Ours is the same model converted to our rules, watched by `per_sample_grads`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import manual_backprop
from manual_backprop import observe
from manual_backprop._checks import InputError

F64 = dict(rtol=1e-9, atol=1e-11)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def reference(model: nn.Module, loss_fn: Callable, x, y, batch_dim: int = 0) -> dict:
    """{name: (N, *p.shape)}: the gradient of each sample's own loss, by torch.func on the stock model."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(params, xn, yn):
        out = functional_call(model, params, (xn.unsqueeze(batch_dim),))
        return loss_fn(out, yn.unsqueeze(batch_dim))

    return vmap(grad(loss_one), in_dims=(None, batch_dim, batch_dim))(params, x, y)


def norms_of(grads: dict) -> torch.Tensor:
    return torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()


def ours(model: nn.Module, loss_fn, x, y, materialize=True, **kwargs):
    with manual_backprop.per_sample_grads(model, materialize=materialize, **kwargs) as ps:
        loss_fn(model(x), y).backward()
    return ps


def mse(out, y):
    return ((out - y) ** 2).mean()


def mse_sum(out, y):
    return ((out - y) ** 2).sum()


class Tied(nn.Module):
    """One Linear used twice, and an embedding tied to the output layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        h = self.embed(x)
        return self.out(torch.tanh(self.hidden(torch.tanh(self.hidden(h)))))


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, stride=2)
        self.grouped = nn.Conv2d(4, 4, 2, groups=2, dilation=1)
        self.norm = nn.GroupNorm(2, 4)
        self.prelu = nn.PReLU(4)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2, output_padding=1)
        self.conv1d = nn.Conv1d(2, 3, 3, padding=2, dilation=2)

    def forward(self, x):
        h = self.prelu(self.norm(self.grouped(torch.tanh(self.conv(x)))))
        h = self.up(h)
        return self.conv1d(h.flatten(2)[..., :12])


class Block(nn.Module):
    """A transformer-style block: embedding, attention, LayerNorm, RMSNorm, MLP."""

    def __init__(self, batch_first=True, packed=True):
        super().__init__()
        self.embed = nn.Embedding(11, 8, padding_idx=0)
        kdim = None if packed else 6
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.key = nn.Linear(8, 8 if packed else 6)
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.ff = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        k = self.key(h)
        h = self.ln(h + self.attn(h, k, k, need_weights=False)[0])
        return self.ff(self.rms(h))


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple]
    loss: Callable = mse
    batch_first: bool = True

    def __repr__(self) -> str:
        return self.name


def _xy(x_shape, y_shape):
    return lambda g: (torch.randn(*x_shape, generator=g, dtype=torch.float64),
                      torch.randn(*y_shape, generator=g, dtype=torch.float64))


def _tokens(x_shape, y_shape, vocab=11):
    return lambda g: (torch.randint(0, vocab, x_shape, generator=g),
                      torch.randn(*y_shape, generator=g, dtype=torch.float64))


CASES = [
    Case("linear", lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), _xy((6, 5), (6, 3))),
    Case("linear_sum", lambda: nn.Sequential(nn.Linear(5, 3)), _xy((6, 5), (6, 3)), loss=mse_sum),
    Case("linear_sequence", lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), _xy((4, 7, 5), (4, 7, 3))),
    Case("linear_batch_1", lambda: nn.Sequential(nn.Linear(5, 3)), _xy((1, 5), (1, 3))),
    Case("mlp", lambda: manual_backprop.nn.MLP([5, 6, 4, 3], activation="tanh"), _xy((6, 5), (6, 3))),
    Case("mlp_sequence", lambda: manual_backprop.nn.MLP([5, 6, 3], activation="tanh"), _xy((3, 4, 5), (3, 4, 3))),
    Case("tied", Tied, _tokens((5, 6), (5, 6, 7), vocab=7)),
    Case("cnn", Cnn, _xy((3, 2, 8, 8), (3, 3, 12))),
    Case("norms_eval", lambda: nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3), nn.LayerNorm([3, 4]),
                                             nn.GroupNorm(1, 3, affine=False)).eval(), _xy((4, 2, 4), (4, 3, 4))),
    Case("block", Block, _tokens((3, 5), (3, 5, 3))),
    Case("block_cross", lambda: Block(packed=False), _tokens((3, 5), (3, 5, 3))),
    Case("block_sequence_first", lambda: Block(batch_first=False), _tokens((5, 3), (5, 3, 3)), batch_first=False),
    Case("transformer_layer", lambda: nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)),
         _xy((3, 4, 8), (3, 4, 8))),
]


def _models(case: Case):
    torch.manual_seed(0)
    stock = case.make().double()
    if isinstance(stock, manual_backprop.nn.MLP):
        return stock, stock  # already ours: torch.func runs our rules under vmap (generate_vmap_rule)
    return stock, manual_backprop.convert(copy.deepcopy(stock))


@pytest.mark.parametrize("materialize", [True, False], ids=["materialize", "norms_only"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_matches_vmap_of_grad(case: Case, materialize: bool):
    stock, model = _models(case)
    x, y = case.inputs(torch.Generator().manual_seed(1))
    expected = reference(stock, case.loss, x, y, batch_dim=0 if case.batch_first else 1)
    loss_reduction = "sum" if case.loss is mse_sum else "mean"
    ps = ours(model, case.loss, x, y, materialize, loss_reduction=loss_reduction, batch_first=case.batch_first)
    params = dict(model.named_parameters())
    if materialize:
        for name, g in expected.items():
            torch.testing.assert_close(params[name].grad_sample, g, **F64, msg=lambda m: f"{name}: {m}")
    else:
        assert all(p.grad_sample is None for p in params.values())
    torch.testing.assert_close(ps.norms, norms_of(expected), **F64)
    # p.grad still accumulates as usual: the sum (or mean) of the per-sample gradients
    for name, g in expected.items():
        total = g.sum(0) / (g.shape[0] if loss_reduction == "mean" else 1)
        torch.testing.assert_close(params[name].grad, total, **F64)


def test_second_backward_accumulates_like_opacus():
    """A second forward/backward in one context: grad_sample becomes a list, norms grow by the second batch."""
    stock, model = _models(CASES[0])
    g = torch.Generator().manual_seed(2)
    (x1, y1), (x2, y2) = _xy((6, 5), (6, 3))(g), _xy((4, 5), (4, 3))(g)
    with manual_backprop.per_sample_grads(model) as ps:
        mse(model(x1), y1).backward()
        mse(model(x2), y2).backward()
    for name, p in model.named_parameters():
        assert isinstance(p.grad_sample, list) and [t.shape[0] for t in p.grad_sample] == [6, 4]
        torch.testing.assert_close(p.grad_sample[1], reference(stock, mse, x2, y2)[name], **F64)
    expected = torch.cat([norms_of(reference(stock, mse, x1, y1)), norms_of(reference(stock, mse, x2, y2))])
    torch.testing.assert_close(ps.norms, expected, **F64)


@pytest.mark.parametrize("name", ["cnn", "block"])
def test_autocast_conv_attention_and_norms_give_float32_results(name):
    """bf16 autocast: the rules run in bf16, the per-sample gradients come back in the parameters' fp32,
    equal to fp32's up to bf16's rounding (compared relative to each gradient's scale)."""
    case = next(c for c in CASES if c.name == name)
    stock, model = _models(case)
    stock, model = stock.float(), model.float()
    x, y = case.inputs(torch.Generator().manual_seed(1))
    x, y = (x.float() if x.is_floating_point() else x), y.float()
    expected = reference(stock, case.loss, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ps = ours(model, lambda o, t: case.loss(o.float(), t), x, y)
    for pname, p in model.named_parameters():
        assert p.grad_sample.dtype == torch.float32, pname
        scale = expected[pname].abs().max()
        torch.testing.assert_close(p.grad_sample, expected[pname], rtol=0, atol=float(0.05 * scale), msg=pname)
    assert ps.norms.dtype == torch.float32
    torch.testing.assert_close(ps.norms, norms_of(expected), rtol=0.05, atol=0)


def test_autocast_gives_float32_results():
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    model = manual_backprop.convert(copy.deepcopy(stock))
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ps = ours(model, lambda o, t: mse(o.float(), t), x, y)
    expected = reference(stock, mse, x, y)
    for name, p in model.named_parameters():
        assert p.grad_sample.dtype == torch.float32
        torch.testing.assert_close(p.grad_sample, expected[name], rtol=5e-2, atol=5e-2)
    assert ps.norms.dtype == torch.float32
    torch.testing.assert_close(ps.norms, norms_of(expected), rtol=5e-2, atol=5e-2)


def test_stock_module_is_named_or_skipped():
    model = nn.Sequential(manual_backprop.nn.Linear(5, 4), nn.Linear(4, 3))  # the second left on stock autograd
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    with pytest.raises(InputError, match=r"1\.weight \(Linear\).*strict=False"):
        ours(model, mse, x, y)
    ps = ours(model, mse, x, y, strict=False)
    assert ps.skipped == ["1.weight (Linear)", "1.bias (Linear)"]
    assert model[0].weight.grad_sample.shape == (6, 4, 5) and model[1].weight.grad_sample is None


def test_batchnorm_in_training_mode_is_refused_by_name():
    model = manual_backprop.convert(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    with pytest.raises(InputError, match=r"1 \(BatchNorm1d\): batch normalisation in training mode"):
        ours(model, mse, torch.randn(5, 3), torch.randn(5, 4))


def test_batchnorm_in_training_mode_still_reports_delta():
    """The tape needs δ and a from every rule, even one without per-sample gradients."""
    model = manual_backprop.convert(nn.Sequential(nn.BatchNorm1d(4)))

    class Record:
        keep_output = True

        def __init__(self):
            self.seen = []

        def see(self, seen):
            self.seen.append(seen)

    record = Record()
    with observe.watch(model, record):
        model(torch.randn(5, 4)).sum().backward()
    (seen,) = record.seen
    assert seen.delta.shape == seen.input.shape == seen.output.shape == (5, 4)
    with pytest.raises(observe.MixesSamples):
        seen.per_sample(seen.delta, seen.input)


def test_scale_grad_by_freq_is_refused():
    model = manual_backprop.convert(nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True)))
    with pytest.raises(InputError, match="scale_grad_by_freq"):
        ours(model, mse, torch.randint(0, 5, (4, 2)), torch.randn(4, 2, 3))


def test_bad_loss_reduction():
    with pytest.raises(InputError, match="loss_reduction"):
        manual_backprop.per_sample_grads(nn.Linear(2, 2), loss_reduction="none")


def test_view_of_parameter_maps_back():
    """A rule handed a view of a parameter reports it under the parameter's name, in the right slice."""
    call = observe.Call("m", manual_backprop.nn.Linear(2, 6), 0, ())
    W = call.module.weight
    name, p, view = call.source(W.chunk(3)[1])
    assert name == "weight" and p is W and view.storage_offset() == 4
