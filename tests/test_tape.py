"""The δ tape: recorded δ and a equal what autograd's tensor hooks see on a stock copy (float64),
for every parametric rule, the fused MLP, leading dimensions, batch 0, a module used twice;
reductions; repeated backward; torch.compile records or raises."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import manual_backprop
import manual_backprop.nn as mnn
from manual_backprop import InputError, convert
from manual_backprop.tape import REDUCTIONS
from tests.cases import DEVICES
from tests.models import ZOO, SharedTwice

TOL = dict(rtol=1e-10, atol=1e-12)


def stock_record(model: nn.Module, forward):
    """What autograd reports on a stock model: for each call of a module holding parameters
    directly, its input (a) and the gradient of its output (δ, by a tensor hook), keyed as the
    tape keys them ("name", "name#1" for its second call in forward order)."""
    calls, handles = [], []
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue

        def hook(module, args, output, name=name):
            if torch._C._current_graph_task_id() != -1:  # a checkpoint recomputing forward inside backward
                return
            entry = {"name": name, "input": args[0].detach(), "delta": None}
            if output.requires_grad:
                output.register_hook(lambda g, entry=entry: entry.__setitem__("delta", g))
            calls.append(entry)

        handles.append(module.register_forward_hook(hook))
    try:
        forward(model).backward()
    finally:
        for handle in handles:
            handle.remove()
    seen: dict = {}
    record = {}
    for entry in calls:
        k = seen[entry["name"]] = seen.get(entry["name"], -1) + 1
        record[entry["name"] if k == 0 else f"{entry['name']}#{k}"] = entry
    return record


def assert_tape_equals_stock(stock: nn.Module, forward, ours: nn.Module | None = None, rename=lambda name: name):
    """Tape on `ours` (default: a converted copy of `stock`) equals autograd's hooks on `stock`."""
    ours = convert(copy.deepcopy(stock)) if ours is None else ours
    expected = stock_record(stock, forward)
    with manual_backprop.tape(ours) as tape:
        forward(ours).backward()
    assert sorted(tape.names) == sorted(rename(name) for name in expected), (tape.names, list(expected))
    assert len(tape.names) == len(set(tape.names))
    for name, entry in expected.items():
        key = rename(name)
        torch.testing.assert_close(tape.input[key], entry["input"], **TOL, msg=f"a of {key}")
        torch.testing.assert_close(tape.delta[key], entry["delta"], **TOL, msg=f"δ of {key}")
    return tape


def mse(*inputs):
    """forward(model) -> loss, on fixed inputs and a fixed random target."""

    def forward(model):
        out = model(*inputs)
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype).to(out.device)
        return F.mse_loss(out, target, reduction="sum")

    return forward


def randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# ------------------------------------------------------------ every parametric rule


def _seq(*modules):
    torch.manual_seed(0)
    return nn.Sequential(*modules).double()


# (name, make stock model, input): every parametric module type we have a rule for, with δ from the loss
# flowing through it, so each records a nonzero δ.
RULE_CASES = [
    ("linear", lambda: _seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), lambda: randn(6, 5)),
    ("linear-no-bias", lambda: _seq(nn.Linear(5, 4, bias=False), nn.Sigmoid(), nn.Linear(4, 3, bias=False)), lambda: randn(6, 5)),
    ("linear-leading-dims", lambda: _seq(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), lambda: randn(2, 3, 5)),
    ("linear-no-batch", lambda: _seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), lambda: randn(5)),
    ("conv1d", lambda: _seq(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 2, 2, stride=2)), lambda: randn(2, 2, 6)),
    ("conv2d", lambda: _seq(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, dilation=2, bias=False)), lambda: randn(2, 2, 5, 5)),
    ("conv2d-groups", lambda: _seq(nn.Conv2d(4, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(36, 2)), lambda: randn(2, 4, 5, 5)),
    ("conv3d", lambda: _seq(nn.Conv3d(1, 2, 2), nn.Tanh(), nn.Conv3d(2, 1, 2)), lambda: randn(2, 1, 4, 4, 4)),
    ("conv-transpose2d", lambda: _seq(nn.ConvTranspose2d(2, 3, 3, stride=2), nn.Tanh(), nn.Conv2d(3, 1, 3)), lambda: randn(2, 2, 3, 3)),
    ("batchnorm1d-train", lambda: _seq(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)), lambda: randn(6, 5)),
    ("batchnorm2d-eval", lambda: _seq(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Conv2d(3, 1, 3)).eval(), lambda: randn(2, 2, 6, 6)),
    ("layernorm", lambda: _seq(nn.Linear(5, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 2)), lambda: randn(2, 3, 5)),
    ("groupnorm", lambda: _seq(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Conv2d(4, 1, 2)), lambda: randn(2, 2, 5, 5)),
    ("rmsnorm", lambda: _seq(nn.Linear(5, 6), nn.RMSNorm(6), nn.Tanh(), nn.Linear(6, 2)), lambda: randn(4, 5)),
    ("prelu", lambda: _seq(nn.Linear(5, 4), nn.PReLU(4, init=0.1), nn.Linear(4, 2)), lambda: randn(6, 5)),
    ("embedding", lambda: _seq(nn.Embedding(10, 4), nn.Tanh(), nn.Linear(4, 2)),
     lambda: torch.randint(10, (3, 5), generator=torch.Generator().manual_seed(0))),
]


@pytest.mark.parametrize("name, make, make_input", RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_tape_equals_autograd_hooks_for_every_parametric_rule(name, make, make_input):
    stock = make()
    tape = assert_tape_equals_stock(stock, mse(make_input()))
    assert tape.names[0] == max(tape.names, key=lambda n: int(n.split("#")[0]))  # backward order: last layer first


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["linear-leading-dims", "conv2d", "layernorm", "embedding"])
def test_tape_on_each_device(name, device):
    _, make, make_input = next(case for case in RULE_CASES if case[0] == name)
    stock, x = make().to(device), make_input().to(device)
    tape = assert_tape_equals_stock(stock, mse(x))
    assert all(t.device == x.device for t in tape.delta.values())


@pytest.mark.parametrize("case", [c for c in ZOO if c.name in ("mlp-Sigmoid", "mlp-bce", "nested-heads", "shared-linear",
                                                                "tied-weights", "transformer-block")], ids=repr)
def test_tape_equals_autograd_hooks_on_the_model_zoo(case):
    stock, inputs, target, loss = case.build(torch.float64)
    assert_tape_equals_stock(stock, lambda model: loss(model(*inputs), target))


def test_module_used_twice_first_call_keeps_the_name():
    torch.manual_seed(0)
    stock = SharedTwice().double()
    x = randn(5, 4)
    tape = assert_tape_equals_stock(stock, mse(x))
    assert tape.names == ["out", "shared#1", "shared", "inp"]  # backward order
    # "shared" is the first call in forward order: its input is inp's output
    torch.testing.assert_close(tape.input["shared"], F.linear(x, stock.inp.weight, stock.inp.bias).detach())


def test_fused_mlp_records_each_layer_as_the_converted_sequential_does():
    torch.manual_seed(0)
    mlp = mnn.MLP([5, 7, 6, 3], activation="tanh", output_activation="sigmoid").double()
    sequential = mlp.to_sequential()  # stock: Linear, Tanh, Linear, Tanh, Linear, Sigmoid
    x = randn(2, 4, 5)  # leading dimensions
    assert_tape_equals_stock(sequential, mse(x), ours=mlp, rename=lambda name: f"layers.{int(name) // 2}")
    # and against our per-layer rules under their own names
    per_layer_model = convert(copy.deepcopy(sequential))
    with manual_backprop.tape(per_layer_model) as per_layer:
        mse(x)(per_layer_model).backward()
    with manual_backprop.tape(mlp) as fused:
        mse(x)(mlp).backward()
    assert [f"layers.{int(n) // 2}" for n in per_layer.names] == fused.names == ["layers.2", "layers.1", "layers.0"]
    for name in per_layer.names:
        torch.testing.assert_close(fused.delta[f"layers.{int(name) // 2}"], per_layer.delta[name], **TOL)


def test_fused_mlp_inside_a_model_is_named_by_its_path():
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Sequential(mnn.MLP([5, 4, 2], "relu"))).double())
    with manual_backprop.tape(model, keep="delta") as tape:
        model(randn(4, 3)).sum().backward()
    assert tape.names == ["2.0.layers.1", "2.0.layers.0", "0"]
    assert tape.input == {}


@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 5)], ids=["batch-0", "leading-0"])
def test_batch_of_zero_records_empty_tensors(shape):
    stock = _seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    tape = assert_tape_equals_stock(stock, lambda model: model(randn(*shape)).sum())
    assert tape.delta["0"].shape == (*shape[:-1], 4)
    assert tape.input["0"].shape == shape
    with manual_backprop.tape(convert(copy.deepcopy(stock)), reduce="norm") as tape:
        tape.model(randn(*shape)).sum().backward()
    assert tape.delta["0"].item() == 0


def test_feedback_alignment_reports_delta_through_B():
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double(), registry="feedback_alignment")
    x = randn(6, 5)
    with manual_backprop.tape(model, keep=("delta", "output")) as tape:
        (model(x) ** 2).sum().backward()
    top = model(x)
    torch.testing.assert_close(tape.delta["2"], 2 * top.detach(), **TOL)  # ∂J/∂z for J = Σ z²
    a1 = torch.tanh(tape.output["0"])
    torch.testing.assert_close(tape.delta["0"], (tape.delta["2"] @ model[2].feedback) * (1 - a1**2), **TOL)


# ------------------------------------------------------------ what is kept, reductions, steps


def test_keep_output_records_the_rule_output():
    stock = _seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    ours = convert(copy.deepcopy(stock))
    x = randn(3, 5)
    with manual_backprop.tape(ours, keep=("output",)) as tape:
        ours(x).sum().backward()
    assert tape.delta == {} and tape.input == {}
    torch.testing.assert_close(tape.output["2"], stock(x).detach(), **TOL)
    torch.testing.assert_close(tape.output["0"], stock[0](x).detach(), **TOL)


def test_reductions_are_the_statistics_of_the_whole_tensors():
    torch.manual_seed(0)
    model = mnn.MLP([5, 6, 3], "tanh").double()
    x = randn(4, 2, 5)
    with manual_backprop.tape(model, keep=("delta", "input")) as whole:
        model(x).pow(2).sum().backward()
    expected = {
        "norm": lambda t: torch.linalg.vector_norm(t),
        "mean_abs": lambda t: t.abs().sum() / t.numel(),
        "rms": lambda t: (t.pow(2).sum() / t.numel()) ** 0.5,
        "per_sample_norm": lambda t: torch.stack([torch.linalg.vector_norm(t[n]) for n in range(len(t))]),
    }
    assert set(expected) == set(REDUCTIONS)
    for reduce, fn in [*expected.items(), (lambda t: t.amax(), lambda t: t.amax())]:
        with manual_backprop.tape(model, keep=("delta", "input"), reduce=reduce) as tape:
            model(x).pow(2).sum().backward()
        for what in ("delta", "input"):
            for name, value in getattr(whole, what).items():
                torch.testing.assert_close(getattr(tape, what)[name], fn(value), **TOL)
    assert tape.delta["layers.0"].shape == ()


def test_reductions_of_indices_no_batch_and_empty():
    t = torch.tensor([[3, 4]])
    assert REDUCTIONS["norm"](t).item() == 5.0  # integer inputs (Embedding's indices) reduce as floats
    assert REDUCTIONS["per_sample_norm"](torch.tensor([3.0, 4.0])).tolist() == [5.0]  # no batch dimension: one sample
    empty = torch.zeros(0, 3)
    assert REDUCTIONS["norm"](empty).item() == 0 and REDUCTIONS["per_sample_norm"](empty).shape == (0,)
    assert REDUCTIONS["mean_abs"](empty).isnan() and REDUCTIONS["rms"](empty).isnan()


def test_each_backward_is_a_step_kept_with_reduce_latest_only_without():
    torch.manual_seed(0)
    model = mnn.MLP([3, 4, 2], "relu").double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    xs = [randn(5, 3) + k for k in range(3)]
    norms = []
    with manual_backprop.tape(model, reduce="norm") as tape, manual_backprop.tape(model, keep="delta") as whole:
        for x in xs:
            optimizer.zero_grad()
            model(x).pow(2).sum().backward()
            optimizer.step()
            norms.append(whole.delta["layers.0"].norm())
            assert len(whole.steps) == 1  # tensors whole: only the latest step
    assert len(tape.steps) == 3
    torch.testing.assert_close(tape.series("layers.0"), torch.stack(norms), **TOL)
    assert tape.names == whole.names == ["layers.1", "layers.0"]
    with manual_backprop.tape(model, keep="delta", history=True) as kept:
        for x in xs[:2]:
            model(x).sum().backward()
    assert len(kept.steps) == 2 and not torch.equal(kept.steps[0].delta["layers.0"], kept.steps[1].delta["layers.0"])


def test_two_forwards_one_backward_is_one_step_keyed_by_call():
    torch.manual_seed(0)
    stock = _seq(nn.Linear(3, 2))
    x, y = randn(4, 3), randn(4, 3) * 2
    tape = assert_tape_equals_stock(stock, lambda model: (model(x) * model(y)).sum())
    assert len(tape.steps) == 1 and set(tape.names) == {"0", "0#1"}
    torch.testing.assert_close(tape.input["0#1"], y)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_one_step(reentrant):
    """A checkpoint recomputes forward inside backward (reentrant: a backward inside backward): one step still."""
    from torch.utils.checkpoint import checkpoint

    stock = _seq(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
    x = randn(3, 4).requires_grad_(reentrant)

    def forward(model):
        h = checkpoint(lambda h: model[3](model[2](model[1](h))), model[0](x), use_reentrant=reentrant)
        return model[4](h).pow(2).sum()

    plain = assert_tape_equals_stock(stock, lambda model: model(x).pow(2).sum())  # the same δ without a checkpoint
    ours = convert(copy.deepcopy(stock))
    with manual_backprop.tape(ours) as tape:
        forward(ours).backward()
    assert len(tape.steps) == 1 and tape.names == plain.names == ["4", "2", "0"]
    for name in plain.names:
        torch.testing.assert_close(tape.delta[name], plain.delta[name], **TOL)
        torch.testing.assert_close(tape.input[name], plain.input[name], **TOL)


def test_under_autocast_delta_and_input_are_what_the_rules_saw():
    model = convert(_seq(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).float())
    x = randn(3, 4).float()
    with manual_backprop.tape(model) as tape, torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().pow(2).sum().backward()
    assert {t.dtype for t in [*tape.delta.values(), *tape.input.values()]} == {torch.bfloat16}
    torch.testing.assert_close(tape.input["0"], x.to(torch.bfloat16), rtol=0, atol=0)
    assert model[0].weight.grad.dtype == torch.float32


def test_recorded_tensors_are_detached_and_gradients_unchanged():
    torch.manual_seed(0)
    stock = _seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    ours = convert(copy.deepcopy(stock))
    x = randn(3, 5).requires_grad_()
    with manual_backprop.tape(ours) as tape:
        (grad_x,) = torch.autograd.grad(ours(x).pow(3).sum(), x, create_graph=True)
    grad_x.sum().backward()  # double backward through our rules: no new step
    assert len(tape.steps) == 1 and not any(t.requires_grad for t in tape.delta.values())
    reference = torch.autograd.grad(stock(x).pow(3).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(grad_x, reference, **TOL)


def test_outside_the_tape_nothing_is_recorded():
    model = mnn.MLP([3, 4, 2]).double()
    with manual_backprop.tape(model) as tape:
        pass
    model(randn(2, 3)).sum().backward()
    assert tape.steps == [] and tape.delta == {} and tape.names == []


def test_stock_model_warns_that_nothing_was_recorded():
    model = _seq(nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="recorded nothing"):
        with manual_backprop.tape(model):
            model(randn(2, 3)).sum().backward()


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep=("delta", "grad")), "'grad'"),
    (dict(keep="inputs"), "'inputs'"),
    (dict(keep=()), "keep is empty"),
    (dict(keep=3), "3"),
    (dict(reduce="max"), "'max'"),
    (dict(reduce=2.0), "2.0"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(InputError, match=match):
        manual_backprop.tape(mnn.Linear(2, 2), **kwargs)


def test_series_errors_name_what_is_missing():
    model = mnn.MLP([3, 4, 2]).double()
    with manual_backprop.tape(model, keep="delta", reduce="norm") as tape:
        model(randn(2, 3)).sum().backward()
    with pytest.raises(InputError, match="'input' is not kept"):
        tape.series("layers.0", "input")
    with pytest.raises(InputError, match="'layers.7'"):
        tape.series("layers.7")
    with manual_backprop.tape(model, keep="delta", reduce="per_sample_norm") as tape:
        for n in (2, 3):
            model(randn(n, 3)).sum().backward()
    with pytest.raises(InputError, match="differ in shape between steps"):
        tape.series("layers.0")
    assert [tuple(step.delta["layers.0"].shape) for step in tape.steps] == [(2,), (3,)]


# ------------------------------------------------------------ torch.compile: record or raise


def _compile_cases(backend):
    """(how, run(model, x)) where the model is compiled in the ways users compile."""

    def compiled_module(model, x):
        compiled = torch.compile(model, backend=backend)
        with manual_backprop.tape(compiled):
            pass

    def module_compile(model, x, warm):
        model.compile(backend=backend)
        if warm:
            model(x).sum().backward()
        with manual_backprop.tape(model) as tape:
            model(x).sum().backward()
        return tape

    def function(model, x, warm):
        step = torch.compile(lambda x: model(x).sum(), backend=backend)
        if warm:  # traced before the tape existed: must not run the old, hook-free graph silently
            step(x).backward()
        with manual_backprop.tape(model) as tape:
            step(x).backward()
        return tape

    return compiled_module, module_compile, function


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "compiled-before-the-tape"])
@pytest.mark.parametrize("how", ["module.compile", "compiled-function"])
def test_compile_records_what_eager_records(how, warm):
    torch._dynamo.reset()
    torch.manual_seed(0)
    stock = _seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x = randn(3, 5)
    eager = assert_tape_equals_stock(stock, lambda model: model(x).sum())
    _, module_compile, function = _compile_cases("aot_eager")
    tape = (module_compile if how == "module.compile" else function)(convert(copy.deepcopy(stock)), x, warm)
    assert tape.names == eager.names
    for name in eager.names:
        torch.testing.assert_close(tape.delta[name], eager.delta[name], **TOL)


def test_compile_of_the_model_object_or_fullgraph_raises_clearly():
    torch._dynamo.reset()
    model = convert(_seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)))
    x = randn(3, 5)
    compiled_module, _, _ = _compile_cases("aot_eager")
    with pytest.raises(InputError, match="cannot watch a torch.compile'd model"):
        compiled_module(model, x)
    step = torch.compile(lambda x: model(x).sum(), backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="watched .* inside torch.compile"):
        with manual_backprop.tape(model):
            step(x).backward()


@pytest.mark.slow
def test_compile_inductor_records_what_eager_records():
    torch._dynamo.reset()
    torch.manual_seed(0)
    stock = _seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x = randn(3, 5)
    eager = assert_tape_equals_stock(stock, lambda model: model(x).sum())
    _, _, function = _compile_cases("inductor")
    tape = function(convert(copy.deepcopy(stock)), x, True)
    for name in eager.names:
        torch.testing.assert_close(tape.delta[name], eager.delta[name], **TOL)


# ------------------------------------------------------------ attention's projections


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_projections(batch_first):
    """Stock attention hides its projections inside one function: δ of the out-projection is the
    gradient of the module's output, and each projection's Σ δᵀa is autograd's weight gradient."""
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(6, 2, batch_first=batch_first).double()
    ours = convert(copy.deepcopy(stock))
    x = randn(3, 4, 6)  # (N, L, E) or (L, N, E)
    out = stock(x, x, x, need_weights=False)[0]
    out.retain_grad()
    target = randn(*out.shape) * 0.5
    F.mse_loss(out, target).backward()
    with manual_backprop.tape(ours, keep=("delta", "input", "output")) as tape:
        F.mse_loss(ours(x, x, x, need_weights=False)[0], target).backward()
    assert tape.names == ["out_proj", "in_proj"]  # the module is the model here: names relative to it
    sequence_first = (lambda t: t.transpose(0, 1)) if batch_first else (lambda t: t)
    torch.testing.assert_close(tape.delta["out_proj"], sequence_first(out.grad), **TOL)
    torch.testing.assert_close(tape.output["out_proj"], sequence_first(out.detach()), **TOL)
    torch.testing.assert_close(tape.input["in_proj"], sequence_first(x), **TOL)
    assert tape.delta["in_proj"].shape == (*sequence_first(x).shape[:2], 18)  # q, k, v packed
    for name, W in (("out_proj", stock.out_proj.weight), ("in_proj", stock.in_proj_weight)):
        delta, a = tape.delta[name].flatten(0, 1), tape.input[name].flatten(0, 1)
        torch.testing.assert_close(delta.T @ a, W.grad, **TOL)


def test_attention_inside_a_model_is_named_by_its_path():
    torch.manual_seed(0)
    model = convert(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).double())
    with manual_backprop.tape(model, keep="delta") as tape:
        model(randn(2, 5, 8)).sum().backward()
    assert sorted(tape.names) == ["linear1", "linear2", "norm1", "norm2", "self_attn.in_proj", "self_attn.out_proj"]


def test_per_sample_norm_of_attention_is_per_sample():
    torch.manual_seed(0)
    model = convert(nn.MultiheadAttention(6, 2).double())  # sequence first: (L, N, E)
    x = randn(4, 3, 6)
    with manual_backprop.tape(model, keep="delta") as whole, manual_backprop.tape(model, keep="delta", reduce="per_sample_norm") as tape:
        model(x, x, x)[0].pow(2).sum().backward()
    for name in ("in_proj", "out_proj"):
        assert tape.delta[name].shape == (3,)
        torch.testing.assert_close(tape.delta[name], whole.delta[name].transpose(0, 1).flatten(1).norm(dim=1), **TOL)


def test_tape_inside_per_sample_grads_both_record():
    """Two watches over one model (a δ monitor while training privately): each gets every report."""
    torch.manual_seed(0)
    stock = _seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    ours = convert(copy.deepcopy(stock))
    x = randn(6, 5)
    with manual_backprop.per_sample_grads(ours) as ps, manual_backprop.tape(ours[2], keep="delta") as inner:
        with manual_backprop.tape(ours, reduce="norm") as outer:
            F.mse_loss(ours(x), torch.zeros(6, 3, dtype=torch.float64)).backward()
    assert ours[0].weight.grad_sample.shape == (6, 4, 5) and ps.norms.shape == (6,)
    assert outer.names == ["2", "0"] and inner.names == [""]  # names relative to each watched model
    torch.testing.assert_close(outer.delta["2"], inner.delta[""].norm(), **TOL)


def test_series_is_nan_where_a_step_did_not_reach_a_layer():
    model = convert(_seq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    x = randn(5, 3)
    with manual_backprop.tape(model, reduce="norm") as tape:
        model(x).sum().backward()
        model[0](x).sum().backward()  # reaches layer 0 only
    assert [step.names for step in tape.steps] == [["2", "0"], ["0"]]
    top = tape.series("2")
    assert top[0] > 0 and top[1].isnan()
    assert tape.series("0")[1] == torch.linalg.vector_norm(torch.ones(5, 4, dtype=torch.float64))
