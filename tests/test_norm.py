"""Normalisation rules: BatchNorm (training and eval, running statistics), LayerNorm, RMSNorm, GroupNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import assume, given
from hypothesis import strategies as st

import manual_backprop as mb
import manual_backprop.functional as MF
import manual_backprop.nn as mnn
from manual_backprop.rules import norm as norm_rules
from tests.cases import CUDA, DEVICES, NORMS, assert_parity, tolerance

# ------------------------------------------------------------------ functional parity


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", NORMS, ids=repr)
def test_parity(case, dtype, device):
    assert_parity(case.ours, case.stock, case.make(device, dtype), case.grad_fn, **tolerance(dtype))


@pytest.mark.parametrize("case", NORMS, ids=repr)
def test_gradcheck_and_gradgradcheck(case):
    inputs = [t.requires_grad_() for t in case.make("cpu", torch.float64)]
    assert torch.autograd.gradcheck(case.ours, inputs)
    assert torch.autograd.gradgradcheck(case.ours, inputs)


@pytest.mark.parametrize("case", [c for c in NORMS if c.name in ("batch_norm_2d", "layer_norm_2d_shape", "group_norm")], ids=repr)
def test_non_contiguous_input(case):
    x, *params = case.make("cpu", torch.float32)
    x = x.transpose(0, -1).contiguous().transpose(0, -1)  # same values, other strides
    assert not x.is_contiguous()
    assert_parity(case.ours, case.stock, [x, *params], case.grad_fn, **tolerance(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c in NORMS if c.name in ("batch_norm_2d", "batch_norm_3d", "batch_norm_eval_2d", "group_norm_one_group_2d")], ids=repr)
def test_channels_last_keeps_its_layout(case, device):
    x, *params = case.make(device, torch.float32)
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    x = x.contiguous(memory_format=fmt).requires_grad_()
    assert_parity(case.ours, case.stock, [x, *params], case.grad_fn, **tolerance(torch.float32))
    out_ours, out_stock = case.ours(x, *params), case.stock(x, *params)
    assert out_ours.is_contiguous(memory_format=fmt) == out_stock.is_contiguous(memory_format=fmt)
    (g_ours,), (g_stock,) = torch.autograd.grad(out_ours.sum(), x), torch.autograd.grad(out_stock.sum(), x)
    assert g_ours.is_contiguous(memory_format=fmt) == g_stock.is_contiguous(memory_format=fmt)


# ------------------------------------------------------------------ the shared algebra


def test_delta_through_normalization_is_the_jacobian_written_out():
    """(1/σ)(g − mean(g) − x̂·mean(g·x̂)) equals gᵀ ∂x̂/∂x from autograd of the plain formula."""
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, dtype=torch.float64)
    for centered in (True, False):
        mean, rstd = norm_rules.statistics(x, [1], 1e-5, centered)
        (expected,) = torch.autograd.grad(norm_rules.normalized(x, mean, rstd), x, g)
        with torch.no_grad():
            got = norm_rules.delta_through_normalization(g, norm_rules.normalized(x, mean, rstd), rstd, [1], centered)
        torch.testing.assert_close(got, expected)


def test_batch_norm_delta_from_its_weight_gradients_is_the_shared_delta():
    """BatchNorm's δ, a δ + b x + c per channel from its own ∂J/∂β = Σδ and ∂J/∂γ = Σδx̂, equals the
    shared (1/σ)(g − mean(g) − x̂·mean(g·x̂)) with g = δγ."""
    x, delta = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 3, 5, dtype=torch.float64)
    gamma = torch.randn(1, 3, 1, dtype=torch.float64)
    mean, rstd = norm_rules.statistics(x, [0, 2], 1e-5)
    x_hat = norm_rules.normalized(x, mean, rstd)
    readable = norm_rules.delta_through_normalization(delta * gamma, x_hat, rstd, [0, 2])
    sum_delta_x_hat, sum_delta = norm_rules.affine_grads(delta, x_hat, [0, 2], True, True)
    sums = (sum_delta.reshape(1, 3, 1), sum_delta_x_hat.reshape(1, 3, 1))
    torch.testing.assert_close(norm_rules.per_channel_delta(delta, x, mean, rstd, rstd * gamma, *sums, 20), readable)


def test_affine_grads_are_sums_over_the_non_feature_dims():
    delta, x_hat = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    gamma, beta = norm_rules.affine_grads(delta, x_hat, [0, 2], True, True)
    torch.testing.assert_close(gamma, torch.stack([(delta[:, c] * x_hat[:, c]).sum() for c in range(3)]))
    torch.testing.assert_close(beta, torch.stack([delta[:, c].sum() for c in range(3)]))
    gamma, beta = norm_rules.affine_grads(delta, x_hat, [], True, True)  # no leading dims: nothing to sum
    torch.testing.assert_close(gamma, delta * x_hat)
    torch.testing.assert_close(beta, delta)


def test_saves_statistics_not_recomputes():
    """The statistics come out of forward as non-differentiable outputs and backward reads them."""
    x = torch.randn(4, 5, requires_grad=True)
    out = MF.layer_norm(x, (5,))
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 5 and saved[3].shape == (4, 1) and saved[4].shape == (4, 1)  # x, γ, β, μ, 1/σ


# ------------------------------------------------------------------ BatchNorm modules: running statistics


BN_MODULES = [
    (mnn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3)),
    (mnn.BatchNorm1d, torch.nn.BatchNorm1d, (4, 3, 5)),
    (mnn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 2, 5)),
    (mnn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 2, 3)),
]
BN_SETTINGS = [
    dict(),
    dict(momentum=None),  # cumulative average over num_batches_tracked
    dict(momentum=0.3, affine=False),
    dict(track_running_stats=False),
    dict(eps=1e-3, bias=False),
]


def _bn_pair(ours_cls, stock_cls, num_channels, device, dtype, **settings):
    if "bias" in settings and "bias" not in stock_cls.__init__.__code__.co_varnames:
        pytest.skip("this torch's BatchNorm has no bias argument")
    torch.manual_seed(0)
    stock = stock_cls(num_channels, **settings).to(device=device, dtype=dtype)
    if stock.affine:
        with torch.no_grad():
            stock.weight.uniform_(0.5, 1.5)
            if stock.bias is not None:
                stock.bias.uniform_(-0.5, 0.5)
    ours = ours_cls(num_channels, **settings).to(device=device, dtype=dtype)
    ours.load_state_dict(stock.state_dict())
    return ours, stock


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("settings", BN_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
@pytest.mark.parametrize("ours_cls,stock_cls,shape", BN_MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_batch_norm_module_steps_then_eval(ours_cls, stock_cls, shape, settings, dtype, device):
    """Several training steps (running mean/var, num_batches_tracked as torch), then eval on the running stats."""
    tol = tolerance(dtype)
    ours, stock = _bn_pair(ours_cls, stock_cls, shape[1], device, dtype, **settings)
    for step in range(3):
        x = (torch.randn(shape, dtype=dtype, device=device) * (step + 1) + step).requires_grad_()
        upstream = torch.randn(shape, dtype=dtype, device=device)
        out_o, out_s = ours(x), stock(x)
        assert type(out_o.grad_fn).__name__ == "BatchNormBackward"
        torch.testing.assert_close(out_o, out_s, **tol)
        params_o, params_s = [x, *ours.parameters()], [x, *stock.parameters()]
        for a, b in zip(torch.autograd.grad(out_o, params_o, upstream), torch.autograd.grad(out_s, params_s, upstream)):
            torch.testing.assert_close(a, b, **tol)
        for (name, a), b in zip(ours.named_buffers(), stock.buffers()):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"step {step}, {name}: {m}")
    ours.eval(), stock.eval()
    x = torch.randn(shape, dtype=dtype, device=device)
    expected_node = "BatchNormEvalBackward" if stock.track_running_stats else "BatchNormBackward"
    assert_parity(ours, stock, [x], expected_node, **tol)
    for a, b in zip(ours.buffers(), stock.buffers()):  # eval leaves the running statistics alone
        torch.testing.assert_close(a, b, **tol)


def test_num_batches_tracked_and_momentum_none_is_the_cumulative_average():
    bn = mnn.BatchNorm1d(2, momentum=None)
    batches = [torch.randn(5, 2, dtype=torch.float64) for _ in range(4)]
    bn.double()
    for x in batches:
        bn(x)
    assert int(bn.num_batches_tracked) == 4
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0) for x in batches]).mean(0))  # factor 1/k at step k


def test_running_var_update_uses_the_unbiased_variance():
    x = torch.randn(6, 3, dtype=torch.float64)
    running_mean, running_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    MF.batch_norm(x, running_mean, running_var, training=True, momentum=0.25)
    torch.testing.assert_close(running_mean, 0.25 * x.mean(0))
    torch.testing.assert_close(running_var, 0.75 + 0.25 * x.var(0, unbiased=True))


def test_running_stats_update_is_not_part_of_the_graph():
    bn = mnn.BatchNorm1d(3)
    bn(torch.randn(4, 3, requires_grad=True)).sum().backward()
    assert bn.running_mean.grad_fn is None and not bn.running_mean.requires_grad


# ------------------------------------------------------------------ shapes and bad input


@given(batch=st.integers(1, 3), spatial=st.lists(st.integers(1, 3), min_size=0, max_size=2), channels=st.integers(1, 3))
def test_batch_norm_hypothesis_shapes(batch, spatial, channels):
    torch.manual_seed(0)
    x = torch.randn(batch, channels, *spatial)
    w, b = torch.rand(channels) + 0.5, torch.randn(channels)
    call = lambda F: lambda x, w, b: F.batch_norm(x, None, None, w, b, True)  # noqa: E731
    values_per_channel = batch * torch.Size(spatial).numel()
    if values_per_channel == 1:  # one value per channel: torch refuses to train on it; so do we
        with pytest.raises(ValueError) as stock:
            call(TF)(x, w, b)
        with pytest.raises(ValueError) as ours:
            call(MF)(x, w, b)
        assert str(ours.value) == str(stock.value)
        return
    assert_parity(call(MF), call(TF), [x, w, b], "BatchNormBackward", **tolerance(torch.float32))


@given(lead=st.lists(st.integers(0, 3), min_size=0, max_size=2), features=st.lists(st.integers(2, 4), min_size=1, max_size=2))
def test_layer_norm_hypothesis_shapes(lead, features):
    """Batch 0 and 1, any leading dims, one or two normalised dims of 3 or more elements in all: over two
    elements span{1, x̂} is the whole space, so ∂J/∂x is exactly 0 and both sides hold rounding noise
    times 1/σ (which rounding a kernel takes then depends on its thread split), and over one x̂ = 0."""
    assume(torch.Size(features).numel() >= 3)
    torch.manual_seed(0)
    x = torch.randn(*lead, *features)
    w, b = torch.randn(features), torch.randn(features)
    assert_parity(
        lambda x, w, b: MF.layer_norm(x, features, w, b), lambda x, w, b: TF.layer_norm(x, features, w, b),
        [x, w, b], "LayerNormBackward", **tolerance(torch.float32),
    )


@given(batch=st.integers(0, 3), groups=st.integers(1, 3), per_group=st.integers(1, 2), spatial=st.lists(st.integers(1, 3), max_size=2))
def test_group_norm_hypothesis_shapes(batch, groups, per_group, spatial):
    torch.manual_seed(0)
    channels = groups * per_group
    x = torch.randn(batch, channels, *spatial)
    w, b = torch.randn(channels), torch.randn(channels)
    call = lambda F: lambda x, w, b: F.group_norm(x, groups, w, b)  # noqa: E731
    if batch * channels // groups * torch.Size(spatial).numel() == 1:  # torch's _verify_batch_size
        with pytest.raises(ValueError):
            call(TF)(x, w, b)
        with pytest.raises(ValueError):
            call(MF)(x, w, b)
        return
    # one or two elements a group: ∂J/∂x is exactly 0, both sides rounding noise (see the LayerNorm test above)
    assume(per_group * torch.Size(spatial).numel() >= 3)
    assert_parity(call(MF), call(TF), [x, w, b], "GroupNormBackward", **tolerance(torch.float32))


BAD = [
    ("layer_norm shape", lambda F: F.layer_norm(torch.randn(2, 3), (4,))),
    ("rms_norm shape", lambda F: F.rms_norm(torch.randn(2, 3), (4,))),
    ("group_norm groups", lambda F: F.group_norm(torch.randn(2, 3), 2)),
    ("group_norm 1-D", lambda F: F.group_norm(torch.randn(3), 1)),
    ("batch_norm running_mean size", lambda F: F.batch_norm(torch.randn(2, 3), torch.zeros(4), torch.ones(4), training=True)),
    ("batch_norm eval without stats", lambda F: F.batch_norm(torch.randn(2, 3), None, None, training=False)),
    ("batch_norm one value per channel", lambda F: F.batch_norm(torch.randn(1, 3), None, None, training=True)),
    ("batch_norm eps", lambda F: F.batch_norm(torch.randn(2, 3), None, None, training=True, eps=0.0)),
]


@pytest.mark.parametrize("name,call", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_as_torch(name, call):
    with pytest.raises((RuntimeError, ValueError)) as stock:
        call(TF)
    with pytest.raises(type(stock.value)) as ours:
        call(MF)
    words = [w for w in str(stock.value).replace(",", " ").split() if len(w) > 4][:4]
    assert all(w in str(ours.value) for w in words), (str(ours.value), str(stock.value))


def test_rms_norm_default_eps_is_torchs():
    """eps=None: the machine epsilon of the computing dtype (tiny inputs make eps dominate)."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.full((2, 4), 1e-4, dtype=dtype) * torch.arange(1, 5, dtype=dtype)
        torch.testing.assert_close(MF.rms_norm(x, (4,)), TF.rms_norm(x, (4,)), **tolerance(dtype))


# ------------------------------------------------------------------ dtypes and autocast


def assert_as_accurate_as_stock(ours, stock, inputs, grad_fn, dtype, autocast=None):
    """Low precision: same output and gradient dtypes as stock, and values at least as close as
    stock's to the float64 answer from the same (rounded) inputs. torch's mixed-dtype kernels
    accumulate ∂J/∂γ in the low dtype; ours accumulate in float32, so equality would be too strict."""
    import contextlib

    def run(fn, tensors, upstream=None):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        with torch.autocast(*autocast) if autocast else contextlib.nullcontext():
            out = fn(*leaves)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out) if upstream is None else upstream
        return out, torch.autograd.grad(out, leaves, upstream.to(out.dtype)), upstream

    out_s, grads_s, upstream = run(stock, inputs)
    out_o, grads_o, _ = run(ours, inputs, upstream)
    if grad_fn is not None:
        assert type(out_o.grad_fn).__name__ == grad_fn
    out_r, grads_r, _ = run(stock, [t.double() for t in inputs], upstream.double())
    tol = tolerance(dtype)
    for i, (o, s, r) in enumerate(zip((out_o, *grads_o), (out_s, *grads_s), (out_r, *grads_r))):
        assert o.dtype == s.dtype and o.shape == s.shape, (i, o.dtype, s.dtype)
        error_ours, error_stock = (o.double() - r).abs(), (s.double() - r).abs()
        slack = tol["atol"] + tol["rtol"] * r.abs()
        assert (error_ours <= error_stock + slack).all(), f"output/gradient {i}: ours {error_ours.max()} vs stock {error_stock.max()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [c for c in NORMS if "running" not in c.name], ids=repr)
def test_low_precision_inputs_with_float32_parameters(case, dtype, device):
    """A bf16/fp16 input beside float32 γ, β (what autocast leaves on CPU): output in the input's dtype."""
    x, *params = case.make(device, torch.float32)
    try:
        case.stock(x.to(dtype), *params)
    except RuntimeError as error:
        pytest.skip(f"torch itself does not support it: {error}")
    assert_as_accurate_as_stock(case.ours, case.stock, [x.to(dtype), *params], case.grad_fn, dtype)


AUTOCAST = [("cpu", torch.bfloat16), pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device"))]


@pytest.mark.parametrize("device_type,dtype", AUTOCAST)
@pytest.mark.parametrize("input_dtype", [torch.float32, "low"], ids=["fp32_input", "low_input"])
@pytest.mark.parametrize("case", [c for c in NORMS if "running" not in c.name], ids=repr)
def test_autocast_matches_stock_dtypes_and_values(case, input_dtype, device_type, dtype):
    """Under autocast: CUDA runs layer/group/rms norm in float32, CPU leaves every norm in its input's dtype."""
    x, *params = case.make(device_type, torch.float32)
    x = x.to(dtype if input_dtype == "low" else input_dtype)
    assert_as_accurate_as_stock(case.ours, case.stock, [x, *params], None, dtype, autocast=(device_type, dtype))


def test_autocast_training_step_linear_layernorm_batchnorm():
    """fp32 parameters, bf16 matmuls, norms in the dtype they receive, fp32 gradients: as stock."""

    def net(nn):
        return torch.nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))

    torch.manual_seed(0)
    stock, ours = net(torch.nn), net(mnn)
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(16, 6)
    for model in (stock, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
    for (name, p_o), p_s in zip(ours.named_parameters(), stock.parameters()):
        assert p_o.grad.dtype == torch.float32
        torch.testing.assert_close(p_o.grad, p_s.grad, rtol=5e-2, atol=5e-2, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(ours[1].running_mean, stock[1].running_mean, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ torch.func, torch.compile, convert


VMAP_MODULES = [
    (mnn.LayerNorm, torch.nn.LayerNorm, dict(normalized_shape=(3, 4)), (3, 4)),
    (mnn.GroupNorm, torch.nn.GroupNorm, dict(num_groups=2, num_channels=4), (4, 3)),
    (mnn.RMSNorm, torch.nn.RMSNorm, dict(normalized_shape=4), (2, 4)),
    (mnn.BatchNorm2d, torch.nn.BatchNorm2d, dict(num_features=3), (3, 2, 2)),  # eval: the running statistics
]


@pytest.mark.parametrize("ours_cls,stock_cls,kwargs,sample_shape", VMAP_MODULES, ids=lambda v: getattr(v, "__name__", None))
def test_vmap_of_grad_per_sample_gradients(ours_cls, stock_cls, kwargs, sample_shape):
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    stock = stock_cls(**kwargs).eval()
    with torch.no_grad():
        for p in stock.parameters():
            p.uniform_(0.5, 1.5)
        for name, b in stock.named_buffers():
            if name == "running_var":
                b.uniform_(0.5, 2.0)
            elif name == "running_mean":
                b.normal_()
    ours = ours_cls(**kwargs).eval()
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(5, *sample_shape)

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        loss = lambda p, xi: (functional_call(model, p, (xi.unsqueeze(0),)) ** 2 * torch.arange(xi.numel()).reshape(xi.shape)).sum()  # noqa: E731
        return vmap(grad(loss), in_dims=(None, 0))(params, x)

    got, expected = per_sample(ours), per_sample(stock)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_aot_eager_fullgraph_training_step(device):
    def net(nn):
        return torch.nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4), nn.GroupNorm(2, 4))

    torch.manual_seed(0)  # float64: GroupNorm over groups of 2 is ill-conditioned, float32 stock drifts
    stock, ours = net(torch.nn).to(device).double(), net(mnn).to(device).double()
    ours.load_state_dict(stock.state_dict())
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(7, 5, device=device, dtype=torch.float64)
    for step in range(2):
        for model in (stock, compiled):
            model(x * (step + 1)).square().sum().backward()
    for (name, p_o), p_s in zip(ours.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p_o.grad, p_s.grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
    for (name, b_o), b_s in zip(ours.named_buffers(), stock.buffers()):
        torch.testing.assert_close(b_o, b_s, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_compile_inductor_same_gradients_and_running_stats():
    torch.manual_seed(0)
    stock = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Hardswish(), torch.nn.Linear(6, 8), torch.nn.LayerNorm(8))
    ours = mb.convert(stock, inplace=False)
    compiled = torch.compile(ours, backend="inductor", fullgraph=True)
    x = torch.randn(7, 5)
    for model in (stock, compiled):
        model(x).square().sum().backward()
    for (name, p_o), p_s in zip(ours.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p_o.grad, p_s.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    for b_o, b_s in zip(ours.buffers(), stock.buffers()):
        torch.testing.assert_close(b_o, b_s, rtol=1e-5, atol=1e-6)


def test_convert_puts_norm_layers_on_our_rules():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Hardswish(), torch.nn.Dropout(0.2),
        torch.nn.Linear(6, 6), torch.nn.LayerNorm(6), torch.nn.ReLU6(), torch.nn.Linear(6, 2), torch.nn.RMSNorm(2),
    )
    keys = list(model.state_dict())
    converted = mb.convert(model)
    assert list(converted.state_dict()) == keys
    for module in converted:
        assert type(module).__module__.startswith("manual_backprop.nn"), type(module)


@pytest.mark.parametrize("routed", ["F.layer_norm", "F.group_norm", "F.batch_norm", "F.rms_norm", "torch.layer_norm"])
def test_manual_functions_routes(routed):
    x, w, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    calls = {
        "F.layer_norm": (lambda x, w, b: TF.layer_norm(x, (6,), w, b), "LayerNormBackward"),
        "F.group_norm": (lambda x, w, b: TF.group_norm(x, 3, w, b), "GroupNormBackward"),
        "F.batch_norm": (lambda x, w, b: TF.batch_norm(x, None, None, w, b, True), "BatchNormBackward"),
        "F.rms_norm": (lambda x, w, b: TF.rms_norm(x, (6,), w) + b, None),
        "torch.layer_norm": (lambda x, w, b: torch.layer_norm(x, (6,), w, b, 1e-5, True), "LayerNormBackward"),
    }
    call, node = calls[routed]
    with mb.manual_functions() as mode:
        assert_parity(call, call, [x, w, b], None, **tolerance(torch.float64))
        out = call(x.requires_grad_(), w, b)
    assert sum(mode.routed.values()) >= 1
    if node:
        assert type(out.grad_fn).__name__ == node


def test_a_mobilenet_style_block_converts_and_matches_stock():
    """BatchNorm → Hardswish(inplace) → Dropout(inplace) → … → Hardsigmoid(inplace): the in-place
    activations overwrite our BatchNorm's output, which its backward does not need (it keeps x)."""
    from manual_backprop.testing import assert_grad_parity

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Hardswish(inplace=True), torch.nn.Dropout(0.2, inplace=True),
        torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU6(inplace=True), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.Hardsigmoid(inplace=True),
    ).double()
    result = assert_grad_parity(model, torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,)), torch.nn.CrossEntropyLoss())
    assert result.rule_nodes["BatchNormBackward"] == 2 and result.rule_nodes["InplaceDropoutBackward"] == 1
    assert result.rule_nodes["InplaceElementwiseBackward"] == 3


# ------------------------------------------------------------------ the native loops (csrc/norm.cpp)

NATIVE = [c for c in NORMS if c.name.startswith(("layer_norm", "group_norm")) or c.grad_fn == "BatchNormBackward"]


def _native_norm_sizes(case):
    """The case's inputs scaled up where BatchNorm's loops need runs of 16 positions or more."""
    x, *params = case.make("cpu", torch.float64)
    if case.grad_fn == "BatchNormBackward" and x.dim() > 2:
        x = torch.randn(x.shape[0], x.shape[1], 4, 5, dtype=torch.float64)
    return [x, *params]


@pytest.mark.parametrize("case", NATIVE, ids=repr)
def test_native_loops_run_and_equal_the_python_rule(case):
    """Forward and every gradient from csrc/norm.cpp against the Python rule (`_native.python_rule()`), float64."""
    from manual_backprop.rules import _native, _native_norm

    if _native_norm.load() is None:
        pytest.skip("the native normalisation loops could not be built here (no C++ compiler or ninja)")
    inputs = _native_norm_sizes(case)
    native_applies = case.grad_fn != "BatchNormBackward" or inputs[0].dim() > 2

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = case.ours(*leaves)
        grads = torch.autograd.grad(out, leaves, torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape))
        return [out, *grads]

    before = _native_norm.calls.copy()
    native = run()
    ran = _native_norm.calls - before
    with _native.python_rule():
        python = run()
    assert (_native_norm.calls - before) == ran  # the Python rule's run called no native loop
    kind = "batch_" if case.grad_fn == "BatchNormBackward" else ""
    assert ran == ({f"{kind}forward": 1, f"{kind}backward": 1} if native_applies else {})
    for got, want in zip(native, python, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_native_loops_float32_match_stock_on_larger_inputs():
    """At sizes where the loops' chunked sums matter (rows of 2¹⁴, channels of 2¹⁴ values), float32 against
    torch's kernels, within float32 parity tolerance; the native loops ran."""
    from manual_backprop.rules import _native_norm

    if _native_norm.load() is None:
        pytest.skip("the native normalisation loops could not be built here (no C++ compiler or ninja)")
    torch.manual_seed(0)
    cases = [(lambda x, w, b: MF.layer_norm(x, (4, 4096), w, b), lambda x, w, b: TF.layer_norm(x, (4, 4096), w, b),
              (3, 4, 4096), (4, 4096), "LayerNormBackward"),
             (lambda x, w, b: MF.group_norm(x, 2, w, b), lambda x, w, b: TF.group_norm(x, 2, w, b), (4, 6, 64, 64), (6,), "GroupNormBackward"),
             (lambda x, w, b: MF.batch_norm(x, None, None, w, b, True), lambda x, w, b: TF.batch_norm(x, None, None, w, b, True),
              (4, 3, 64, 64), (3,), "BatchNormBackward")]
    for ours, stock, shape, param_shape, grad_fn in cases:
        before = sum(_native_norm.calls.values())
        x, w, b = torch.randn(shape) * 3 + 5, torch.randn(param_shape), torch.randn(param_shape)
        assert_parity(ours, stock, [x, w, b], grad_fn, **tolerance(torch.float32))
        assert sum(_native_norm.calls.values()) > before
