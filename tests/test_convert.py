"""convert / restore / report: the model zoo on our rules, and everything convert must leave alone."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

import manual_backprop as mb
import manual_backprop.nn as mnn
from manual_backprop.testing import assert_grad_parity, rule_nodes
from tests.cases import DEVICES
from tests.models import DTYPES, ZOO, SharedTwice, TiedWeights, TransformerBlock, mlp


def _build(case, dtype, device="cpu"):
    return case.build(dtype, device)


# ----------------------------------------------------------- zoo parity


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ZOO, ids=repr)
def test_zoo_matches_autograd_through_convert(case, dtype):
    model, inputs, target, loss = _build(case, dtype)
    result = assert_grad_parity(model, inputs, target, loss)
    assert case.convert_nodes <= set(result.rule_nodes), f"rules that did not run: {case.convert_nodes - set(result.rule_nodes)}"


@pytest.mark.parametrize("device", DEVICES)
def test_transformer_block_on_device(device):
    case = next(c for c in ZOO if c.name == "transformer-block")
    model, inputs, target, loss = _build(case, torch.float32, device)
    result = assert_grad_parity(model, inputs, target, loss)
    assert {"LinearBackward", "SoftmaxBackward", "GELUBackward"} <= set(result.rule_nodes)
    converted = mb.convert(model)
    assert all(p.device.type == device for p in converted.parameters())


# ---------------------------------------------------- what convert keeps


def test_inplace_keeps_every_module_and_parameter_object():
    model = TransformerBlock()
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = mb.convert(model, inplace=True)
    assert out is model
    assert all(modules[n] is m for n, m in model.named_modules())
    assert all(params[n] is p for n, p in model.named_parameters())
    assert type(model.q) is mnn.Linear and isinstance(model.q, nn.Linear)
    # the optimizer built before convert still trains the converted model
    before = model.q.weight.detach().clone()
    x = torch.randn(2, 5, 8)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 2])).backward()
    assert model.q.weight.grad is not None
    optimizer.step()
    assert not torch.equal(model.q.weight, before)


def test_copy_leaves_the_callers_model_untouched():
    model = TransformerBlock()
    state = copy.deepcopy(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    converted = mb.convert(model)
    assert converted is not model
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p1 is not p2 for p1, p2 in zip(model.parameters(), converted.parameters()))
    assert type(converted.q) is mnn.Linear


@pytest.mark.parametrize("inplace", [True, False])
def test_state_dict_device_dtype_and_mode_unchanged(inplace):
    model = TransformerBlock().to(torch.float64)
    model.mlp.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = mb.convert(model, inplace=inplace)
    new_state = converted.state_dict()
    assert list(new_state) == list(state)
    assert all(torch.equal(new_state[k], state[k]) and new_state[k].dtype == torch.float64 for k in state)
    assert converted.training and not converted.mlp.training and not converted.mlp[0].training
    # a stock checkpoint loads into the converted model, strictly
    converted.load_state_dict(TransformerBlock().to(torch.float64).state_dict())


@pytest.mark.parametrize("inplace", [True, False])
def test_hooks_survive_conversion(inplace):
    model = mlp(nn.Tanh())
    calls = []
    model[0].register_forward_pre_hook(lambda m, args: calls.append("pre"))
    model[0].register_forward_hook(lambda m, args, out: calls.append("forward"))
    model[2].register_full_backward_hook(lambda m, gin, gout: calls.append(("backward", gout[0].shape)))
    converted = mb.convert(model, inplace=inplace)
    y = converted(torch.randn(4, 5, requires_grad=True))
    assert y.grad_fn is not None
    y.sum().backward()
    assert calls == ["pre", "forward", ("backward", torch.Size([4, 3]))]


def test_convert_twice_changes_nothing():
    model = mb.convert(TransformerBlock())
    before = mb.report(model)
    state = model.state_dict()
    again = mb.convert(model, inplace=True)
    assert again is model and mb.report(again) == before
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items())


def test_restore_round_trip():
    model = TransformerBlock()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    back = mb.restore(mb.convert(model))
    assert {n: type(m) for n, m in back.named_modules()} == types
    assert all(torch.equal(state[k], v) for k, v in back.state_dict().items())
    x = torch.randn(2, 5, 8, requires_grad=True)
    assert "LinearBackward" not in rule_nodes(back(x).sum())
    assert mb.report(back).manual == []


def test_restore_inplace_keeps_parameter_objects():
    model = mb.convert(mlp(nn.ReLU()))
    params = list(model.parameters())
    assert mb.restore(model, inplace=True) is model
    assert type(model[0]) is nn.Linear and all(a is b for a, b in zip(params, model.parameters()))


def test_root_module_itself_is_converted():
    linear = nn.Linear(3, 2)
    converted = mb.convert(linear)
    assert type(converted) is mnn.Linear
    assert converted(torch.randn(4, 3)).grad_fn.name() == "LinearBackward"


# -------------------------------------------------------- weight sharing


def test_module_shared_under_two_names_stays_one_object():
    model = mb.convert(SharedTwice())
    assert model.shared is model.alias and type(model.shared) is mnn.Linear
    report = mb.report(model)
    assert report.row("shared").status == report.row("alias").status == "manual"


@pytest.mark.parametrize("model_type", [SharedTwice, TiedWeights])
def test_shared_weights_accumulate_like_autograd(model_type):
    torch.manual_seed(0)
    model = model_type().double()
    x = torch.randn(5, model.inp.in_features if hasattr(model, "inp") else 5, dtype=torch.float64)
    result = assert_grad_parity(model, x, torch.randn_like(model(x)), nn.MSELoss())
    shared = "grad shared.weight" if model_type is SharedTwice else "grad encode.weight"
    assert any(r.name == shared for r in result.rows)
    converted = mb.convert(model)
    if model_type is TiedWeights:
        assert converted.again.weight is converted.encode.weight  # the tie survives the deep copy


# ---------------------------------------- unsupported, strict, include/exclude


class MyLinear(nn.Linear):
    def forward(self, input):
        return super().forward(input) * 2


def test_unsupported_modules_stay_stock_with_a_reason():
    model = nn.Sequential(nn.Linear(3, 3), MyLinear(3, 3), nn.InstanceNorm1d(3, affine=True), nn.Softsign(), nn.Linear(3, 3))
    model[4].forward = lambda x: x  # patched on the instance
    report = mb.report(mb.convert(model))
    assert report.row("0").status == "manual"
    assert report.row("1").status == "stock" and "subclass of torch.nn.Linear" in report.row("1").reason
    assert report.row("2").status == "stock" and "no rule registered for torch.nn.InstanceNorm1d" in report.row("2").reason
    assert report.row("3").status == "stock"
    assert report.row("4").status == "stock" and "overridden on this instance" in report.row("4").reason
    assert report.row("").status == "container"


def test_complex_linear_stays_stock():
    model = nn.Sequential(nn.Linear(3, 3, dtype=torch.complex64), nn.Linear(3, 3))
    converted = mb.convert(model)
    assert type(converted[0]) is nn.Linear and type(converted[1]) is mnn.Linear
    assert "complex" in mb.report(converted).row("0").reason


def test_strict_names_every_stock_module_with_parameters():
    model = nn.Sequential(nn.Linear(3, 3), nn.InstanceNorm1d(3, affine=True), nn.Softsign(), MyLinear(3, 3))
    with pytest.raises(mb.ConversionError) as error:
        mb.convert(model, strict=True, inplace=True)
    message = str(error.value)
    assert "1 (torch.nn.InstanceNorm1d)" in message and "3 (tests.test_convert.MyLinear)" in message
    assert "Softsign" not in message  # no parameters: nothing to train on autograd
    assert type(model[0]) is nn.Linear  # a strict failure converts nothing
    mb.convert(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), strict=True)  # fully supported: no error


def test_strict_accepts_modules_the_caller_excluded():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    converted = mb.convert(model, strict=True, exclude="1")
    assert type(converted[0]) is mnn.Linear and type(converted[1]) is nn.Linear


@pytest.mark.parametrize(
    "include, exclude, manual",
    [
        (None, None, {"trunk.0", "trunk.1", "mix", "heads.classes", "heads.value.0", "heads.value.1"}),
        ([nn.Linear], None, {"trunk.0", "mix", "heads.classes", "heads.value.0"}),
        ("heads", None, {"heads.classes", "heads.value.0", "heads.value.1"}),
        ("heads.*", [nn.Sigmoid], {"heads.classes", "heads.value.0"}),
        (None, ["trunk", "heads.value"], {"mix", "heads.classes"}),
        (None, nn.Sequential, {"mix", "heads.classes"}),
        (None, "*", set()),
    ],
)
def test_include_exclude(include, exclude, manual):
    from tests.models import Heads

    converted = mb.convert(Heads(), include=include, exclude=exclude)
    report = mb.report(converted, include=include, exclude=exclude)
    assert set(report.names("manual")) == manual
    for row in report.stock:
        if row.type in ("torch.nn.Linear", "torch.nn.Tanh", "torch.nn.Sigmoid"):
            assert "include" in row.reason or "excluded" in row.reason


def test_include_exclude_reject_other_things():
    with pytest.raises(TypeError, match="include/exclude"):
        mb.convert(nn.Linear(2, 2), include=[3])


def test_shared_module_excluded_under_one_name_stays_stock():
    model = mb.convert(SharedTwice(), exclude="alias")
    assert type(model.shared) is nn.Linear
    assert "shared with 'alias'" in mb.report(model, exclude="alias").row("shared").reason


# --------------------------------------------------------------- report


def test_report_is_data_and_a_table():
    model = mb.convert(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.InstanceNorm1d(4, affine=True)))
    report = mb.report(model)
    assert [(r.name, r.status) for r in report] == [("", "container"), ("0", "manual"), ("1", "manual"), ("2", "stock")]
    assert report.manual_parameters == 16 and report.stock_parameters == 8
    assert report.to_dicts()[1] == dict(
        name="0", type="manual_backprop.nn.Linear", status="manual", reason="rule manual_backprop.nn.Linear", parameters=16
    )
    table = str(report)
    assert "torch.nn.InstanceNorm1d" in table and "no rule registered" in table
    assert "2 manual (16 parameters), 1 stock (8 parameters), 1 containers, 66.7%" in table
    unconverted = mb.report(nn.Sequential(nn.Linear(3, 4)))
    assert "not converted" in unconverted.row("0").reason


def test_copy_failure_is_explained():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.cache = self.lin.weight * 2  # a non-leaf tensor: deepcopy refuses it

    with pytest.raises(RuntimeError, match="inplace=True"):
        mb.convert(Holder())
    assert type(mb.convert(Holder(), inplace=True).lin) is mnn.Linear


# ------------------------------------------------- compile, DDP, grad hooks


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_gives_the_same_gradients(backend):
    torch._dynamo.reset()
    case = next(c for c in ZOO if c.name == "mlp-Tanh")
    model, (x,), target, loss = case.build(torch.float64)
    stock = copy.deepcopy(model)
    converted = mb.convert(model)
    compiled = torch.compile(converted, backend=backend, fullgraph=True)
    loss(compiled(x), target).backward()
    nn.MSELoss()(stock(x), target).backward()
    for (name, p), s in zip(converted.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, s.grad, msg=name)


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    model, (x,), target, loss = next(c for c in ZOO if c.name == "mlp-GELU").build(torch.float32)
    stock, converted = copy.deepcopy(model), mb.convert(model)
    loss(torch.compile(converted)(x), target).backward()
    nn.MSELoss()(stock(x), target).backward()
    for p, s in zip(converted.parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, s.grad)


def test_gradient_hooks_fire_through_normal_accumulation():
    model = mb.convert(mlp(nn.ReLU()))
    seen, accumulated = [], []
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: seen.append(name))
        p.register_post_accumulate_grad_hook(lambda p, name=name: accumulated.append((name, p.grad.clone())))
    x = torch.randn(4, 5)
    for _ in range(2):  # two backward passes accumulate into .grad, as autograd does
        model(x).pow(2).sum().backward()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(seen) == sorted(names * 2)
    first = {n: g for n, g in accumulated[: len(names)]}
    second = {n: g for n, g in accumulated[len(names) :]}
    for n in names:
        torch.testing.assert_close(second[n], 2 * first[n])


def test_distributed_data_parallel(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = mlp(nn.Tanh()).double()
        stock = copy.deepcopy(model)
        ddp = DistributedDataParallel(mb.convert(model))
        x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
        out = ddp(x)
        assert "LinearBackward" in rule_nodes(out.sum())
        nn.functional.mse_loss(out, y).backward()  # the reducer's hooks all-reduce our gradients
        nn.functional.mse_loss(stock(x), y).backward()
        for p, s in zip(ddp.module.parameters(), stock.parameters()):
            torch.testing.assert_close(p.grad, s.grad)
        # the reducer holds the process group: free it while the group and its store still exist (gloo's
        # destructor, run after destroy_process_group, has been seen to wait forever on its worker threads)
        del ddp, out
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_lazy_and_parametrized_modules_are_reported_stock_attention_converts():
    parametrized = nn.utils.parametrize.register_parametrization(nn.Linear(3, 3), "weight", nn.Identity())
    model = nn.Sequential(parametrized, nn.LazyLinear(3), nn.MultiheadAttention(3, 1))
    report = mb.report(mb.convert(model))
    assert "ParametrizedLinear (subclass of torch.nn.Linear made by torch.nn.utils.parametrize" in report.row("0").reason
    assert report.row("1").reason.startswith("lazy module not materialised") and report.row("1").parameters == 0
    assert report.row("2").status == report.row("2.out_proj").status == "manual"
    assert report.row("2.out_proj").reason.endswith("subclass with the base's forward")
    model[1](torch.randn(2, 3))  # materialise the lazy layer
    assert type(mb.convert(model)[1]) is mnn.Linear  # LazyLinear became torch.nn.Linear: now converted


# ------------------------------------------ subclasses, shared parameters, parameters used directly


class SameForwardLinear(nn.Linear):
    """A subclass that keeps Linear's forward (like torch's NonDynamicallyQuantizableLinear)."""


def test_subclass_with_the_base_forward_converts_like_its_base_and_restores_to_itself():
    ndq = nn.modules.linear.NonDynamicallyQuantizableLinear
    model = nn.Sequential(ndq(3, 4), SameForwardLinear(4, 2), MyLinear(2, 2))
    converted = mb.convert(model)
    report = mb.report(converted)
    for name, cls in (("0", ndq), ("1", SameForwardLinear)):
        module = converted[int(name)]
        assert isinstance(module, cls) and isinstance(module, mnn.Linear) and type(module) is not cls
        assert report.row(name).status == "manual" and report.row(name).reason.endswith("subclass with the base's forward")
    assert repr(converted) == repr(model)  # the counterpart keeps the subclass's name
    assert report.row("2").status == "stock" and "overrides forward" in report.row("2").reason
    x = torch.randn(5, 3, requires_grad=True)
    assert rule_nodes(converted(x)) == {"LinearBackward": 2}
    assert type(mb.convert(model)[0]) is type(converted[0])  # one counterpart class per subclass
    restored = mb.restore(converted)
    assert [type(m) for m in restored] == [ndq, SameForwardLinear, MyLinear]


class OwnFeedForward(nn.TransformerEncoderLayer):
    """Keeps torch's forward but changes a method it calls: a rule's forward would drop that."""

    def _ff_block(self, x):
        return super()._ff_block(x) * 2


class ExtraParameter(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unused = nn.Parameter(torch.zeros(2))  # the base's forward never reads it


def test_subclass_overriding_a_method_the_forward_calls_stays_stock():
    report = mb.report(mb.convert(OwnFeedForward(8, 2, dim_feedforward=8)))
    row = report.row("")  # no parameters of its own: a container whose own forward runs stock
    assert row.status == "container" and "that overrides _ff_block" in row.reason
    assert report.row("linear1").status == "manual"
    converted = mb.convert(ExtraParameter(3, 2))
    assert isinstance(converted, mnn.Linear) and mb.report(converted).row("").status == "manual"


def test_subclass_counterpart_pickles_by_reference(tmp_path):
    converted = mb.convert(nn.Sequential(SameForwardLinear(3, 2)))
    torch.save(converted, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(loaded[0]) is type(converted[0])


def test_subclass_report_before_convert_says_a_rule_is_available():
    report = mb.report(nn.Sequential(SameForwardLinear(3, 2)))
    assert report.row("0").status == "stock" and "subclass with the base's forward" in report.row("0").reason


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(self.embed(x))


def test_shared_parameter_is_manual_only_if_every_owner_is():
    both = mb.report(mb.convert(Tied()))
    assert both.parameter("embed.weight").status == "manual" and both.manual_parameters == 28
    assert both.parameter("embed.weight").owners == ("embed.weight", "out.weight")
    half = mb.report(mb.convert(Tied(), exclude=["out"]), exclude=["out"])
    assert half.row("embed").status == "manual" and half.row("out").status == "stock"
    assert half.row("embed").reason.endswith("weight shared with a stock module: counted as stock")
    assert half.parameter("embed.weight").status == "stock" and half.manual_parameters == 0
    assert half.stock_parameters == 28  # counted once
    assert "embed.weight (28): shared by 2 modules" in str(half)


class WithToken(nn.Module):
    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(torch.cat([self.token.expand(x.shape[0], -1), x], dim=0))


def test_parameters_used_directly_by_a_custom_forward_are_listed_stock():
    report = mb.report(mb.convert(WithToken()))
    row = report.parameter("token")
    assert row.status == "stock" and "custom forward uses its own parameters (token) directly" in row.reason
    assert report.parameter("proj.weight").status == "manual"
    assert [p.name for p in report.stock_parameter_rows] == ["token"]


def test_identity_adds_no_node_after_convert():
    model = mb.convert(nn.Sequential(nn.Linear(3, 3), nn.Identity(), nn.Identity()))
    x = torch.randn(2, 3, requires_grad=True)
    out = model(x)
    assert out.grad_fn.name() == "LinearBackward" and rule_nodes(out) == {"LinearBackward": 1}
    assert model[1](x) is x


def _graph_names(out: torch.Tensor) -> list[str]:
    names, stack, seen = [], [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack += [n for n, _ in node.next_functions]
    return names


def test_modules_with_nothing_to_compute_add_no_nodes_after_convert():
    """Identity, eval-mode Dropout and Flatten add nothing of their own (Flatten's view node is torch's, before and after)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Identity(), nn.Dropout(0.5), nn.Flatten(0), nn.Identity()).eval()
    x = torch.randn(2, 3, requires_grad=True)
    stock = [n for n in _graph_names(model(x)) if not n.startswith(("AddmmBackward", "TBackward", "AccumulateGrad"))]
    converted = mb.convert(model)
    names = [n for n in _graph_names(converted(x)) if n != "AccumulateGrad"]
    assert sorted(names) == sorted(stock + ["LinearBackward"])  # the view of Flatten, and our Linear
