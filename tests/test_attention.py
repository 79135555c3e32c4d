"""Attention: S = QKᵀ·scale (+ mask), P = softmax(S), O = PV, against torch's scaled_dot_product_attention,
and MultiheadAttention / Transformer layers built on it against torch's modules."""

from __future__ import annotations

import inspect
from functools import partial

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import manual_backprop as mb
import manual_backprop.functional as MF
import manual_backprop.nn as mnn
from manual_backprop.testing import rule_nodes
from tests.cases import ATTENTION_CASES, CUDA, DEVICES, FLOAT32, FLOAT64, AttentionCase, assert_parity, leaf

SDPA_OURS, SDPA_STOCK = MF.scaled_dot_product_attention, TF.scaled_dot_product_attention


def _parity(case: AttentionCase, device, dtype, tol):
    inputs = case.make(device, dtype)
    assert_parity(case.call(SDPA_OURS), case.call(SDPA_STOCK), inputs, "AttentionBackward", **tol)


# ------------------------------------------------------------- the rule


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=repr)
def test_parity(case, dtype, device):
    if case.mask == "float_grad" and device == "cuda":
        pytest.skip("torch's fused CUDA kernels give no gradient for a float mask")
    _parity(case, device, dtype, FLOAT64 if dtype == torch.float64 else FLOAT32)


# tiny shapes: gradgradcheck's cost grows with the square of the elements
GRADCHECK = [
    AttentionCase("3d", (2,), 3, 3, E=2, Ev=2),
    AttentionCase("bool_full_rows", (1, 2), 3, 3, E=2, Ev=2, mask="bool_full_rows"),
    AttentionCase("float_mask_grad", (1,), 2, 3, E=2, Ev=2, mask="float_grad"),
    AttentionCase("causal_L_gt_S", (1,), 3, 2, E=2, Ev=2, kwargs=dict(is_causal=True)),
    AttentionCase("gqa_mask", (1, 4), 2, 2, kv_batch=(1, 2), E=2, Ev=2, mask="bool", kwargs=dict(enable_gqa=True)),
    AttentionCase("broadcast_kv", (2, 2), 2, 3, kv_batch=(1, 2), E=2, Ev=2),
]


@pytest.mark.parametrize("case", GRADCHECK, ids=repr)
def test_gradcheck_and_gradgradcheck(case):
    inputs = [leaf(t) for t in case.make("cpu", torch.float64)]
    fn = case.call(SDPA_OURS)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)  # a random projection: the full one is slow


def test_gradcheck_with_dropout_and_weights_output():
    """Dropout with a fixed mask (same seed each call), and P's own gradient (the need_weights path)."""
    q, k, v = (torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        torch.manual_seed(0)
        O, P = MF.attention_with_weights(q, k, v, dropout_p=0.4)
        return O, P

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_dropout_matches_torch_on_cpu_and_saves_a_bool_mask():
    """On CPU, torch's dropout draws bernoulli(1 − p) on a tensor shaped like P; so do we, so the masks agree."""
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    torch.manual_seed(7)
    stock_in = [leaf(t) for t in (q, k, v)]
    stock = SDPA_STOCK(*stock_in, dropout_p=0.3)
    torch.manual_seed(7)
    ours_in = [leaf(t) for t in (q, k, v)]
    ours = SDPA_OURS(*ours_in, dropout_p=0.3)
    torch.testing.assert_close(ours, stock, **FLOAT32)
    saved = [t for t in ours.grad_fn.saved_tensors if t is not None]
    assert [t.dtype for t in saved if t.shape == (2, 3, 5, 5)].count(torch.bool) == 1  # keep, one byte per weight
    upstream = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, ours_in, upstream), torch.autograd.grad(stock, stock_in, upstream)):
        torch.testing.assert_close(a, b, **FLOAT32)


def test_algebra_written_out():
    """∂V = Pᵀδ, ∂P = δVᵀ, ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)), ∂Q = ∂S K·scale, ∂K = ∂Sᵀ Q·scale."""
    q, k, v = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    delta = torch.randn(3, 4, dtype=torch.float64)
    scale = 0.7
    O = SDPA_OURS(q, k, v, scale=scale)
    grad_q, grad_k, grad_v = torch.autograd.grad(O, [q, k, v], delta)
    Q, K, V = q.detach(), k.detach(), v.detach()
    P = torch.softmax(Q @ K.T * scale, dim=-1)
    grad_P = delta @ V.T
    grad_S = P * (grad_P - (grad_P * P).sum(-1, keepdim=True))
    torch.testing.assert_close(grad_v, P.T @ delta)
    torch.testing.assert_close(grad_q, grad_S @ K * scale)
    torch.testing.assert_close(grad_k, grad_S.T @ Q * scale)


@pytest.mark.parametrize("mask_kind", ["bool_full_rows", "float_full_rows"])
def test_fully_masked_rows_give_what_torch_gives(mask_kind):
    """torch 2.13 gives zeros (output and gradients) for a query that may attend to nothing; so do we."""
    case = AttentionCase("full", (2, 2), 4, 5, mask=mask_kind)
    q, k, v, mask = case.make("cpu", torch.float32)
    ours, stock = SDPA_OURS(q, k, v, mask), SDPA_STOCK(q, k, v, mask)
    assert torch.equal(stock[..., 2, :], torch.zeros_like(stock[..., 2, :]))
    torch.testing.assert_close(ours, stock, **FLOAT32)
    _parity(case, "cpu", torch.float32, FLOAT32)


def test_computes_only_requested_gradients_correctly():
    q, k, v = (torch.randn(2, 3, 4) for _ in range(3))
    v.requires_grad_()
    out = SDPA_OURS(q, k, v)
    (grad_v,) = torch.autograd.grad(out.sum(), [v])
    P = torch.softmax(q @ k.transpose(-2, -1) / 2, -1)
    torch.testing.assert_close(grad_v, P.transpose(-2, -1) @ torch.ones(2, 3, 4))


@pytest.mark.parametrize(
    "kwargs,inputs,match",
    [
        (dict(is_causal=True), "mask", "attn_mask should not be set when is_causal"),
        ({}, "bad_E", "disagree"),
        (dict(enable_gqa=True), "bad_gqa", "multiple of the key and value heads"),
        ({}, "1d", "at least 2 dimensions"),
    ],
)
def test_errors_like_torch(kwargs, inputs, match):
    q, k, v = torch.randn(2, 4, 3, 4), torch.randn(2, 4, 5, 4), torch.randn(2, 4, 5, 3)
    mask = None
    if inputs == "mask":
        mask = torch.ones(3, 5, dtype=torch.bool)
    elif inputs == "bad_E":
        k = torch.randn(2, 4, 5, 3)
    elif inputs == "bad_gqa":
        k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 3)
    elif inputs == "1d":
        q = torch.randn(4)
    with pytest.raises(RuntimeError):
        SDPA_STOCK(q, k, v, attn_mask=mask, **kwargs)
    with pytest.raises(mb.InputError, match=match):
        SDPA_OURS(q, k, v, attn_mask=mask, **kwargs)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.lists(st.integers(0, 2), min_size=0, max_size=2),
    L=st.integers(1, 4),
    S=st.integers(1, 4),
    E=st.integers(1, 4),
    mask=st.sampled_from([None, "bool", "float", "bool_full_rows", "float_full_rows"]),
    causal=st.booleans(),
)
def test_parity_hypothesis_shapes(batch, L, S, E, mask, causal):
    kwargs = dict(is_causal=True) if causal and mask is None else {}
    case = AttentionCase("h", tuple(batch), L, S, E=E, Ev=E, mask=mask, kwargs=kwargs)
    _parity(case, "cpu", torch.float64, FLOAT64)


# ------------------------------------------------- composing with torch features


@pytest.mark.parametrize("case", [c for c in ATTENTION_CASES if c.name in {"4d", "bool_mask", "float_mask", "gqa"}], ids=repr)
def test_autocast_cpu_bfloat16(case):
    inputs = case.make("cpu", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours_in, stock_in = [leaf(t) for t in inputs], [leaf(t) for t in inputs]
        ours, stock = case.call(SDPA_OURS)(*ours_in), case.call(SDPA_STOCK)(*stock_in)
    assert ours.dtype == stock.dtype == torch.bfloat16
    torch.testing.assert_close(ours, stock, rtol=2e-2, atol=2e-2)
    upstream = torch.randn_like(stock)
    ours.backward(upstream)
    stock.backward(upstream)
    assert ours_in[0].grad.dtype == torch.float32  # casts are differentiable: fp32 leaves get fp32 gradients
    torch.testing.assert_close(ours_in[0].grad, stock_in[0].grad, rtol=5e-2, atol=5e-2)


def test_torch_compile_fullgraph():
    case = [c for c in ATTENTION_CASES if c.name == "bool_mask"][0]
    q, k, v, mask = case.make("cpu", torch.float32)
    compiled = torch.compile(partial(SDPA_OURS, attn_mask=mask), backend="aot_eager", fullgraph=True)
    ours_in, stock_in = [leaf(t) for t in (q, k, v)], [leaf(t) for t in (q, k, v)]
    out = compiled(*ours_in)
    torch.testing.assert_close(out, SDPA_STOCK(*stock_in, attn_mask=mask), **FLOAT32)
    for a, b in zip(torch.autograd.grad(out.sum(), ours_in), torch.autograd.grad(SDPA_STOCK(*stock_in, attn_mask=mask).sum(), stock_in)):
        torch.testing.assert_close(a, b, **FLOAT32)


def test_vmap_of_grad():
    """Per-sample gradients of a loss through attention, torch.func.vmap(grad(...))."""
    q, k, v = (torch.randn(5, 3, 4, dtype=torch.float64) for _ in range(3))

    def loss(fn, q, k, v):
        return fn(q, k, v).square().sum()

    ours = torch.func.vmap(torch.func.grad(partial(loss, SDPA_OURS), argnums=(0, 1, 2)))(q, k, v)
    stock = torch.func.vmap(torch.func.grad(partial(loss, SDPA_STOCK), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a, b, **FLOAT64)


# ------------------------------------------------------------- MultiheadAttention


def _parameters(fn):
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]


def _kpm(L, S, N):
    mask = torch.zeros(N, S, dtype=torch.bool)
    mask[:, -1] = True  # the last key is padding
    return mask


def _random_mask(L, S, N):
    return torch.rand(L, S, generator=torch.Generator().manual_seed(3)) > 0.6


def _causal(L, S, N):
    return nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)


MHA_OPTIONS = [
    {}, dict(batch_first=True), dict(bias=False), dict(add_bias_kv=True), dict(add_zero_attn=True),
    dict(kdim=6, vdim=7), dict(dropout=0.3), dict(add_bias_kv=True, add_zero_attn=True, batch_first=True),
]
MHA_CALLS = [
    {}, dict(need_weights=False), dict(average_attn_weights=False), dict(key_padding_mask=_kpm),
    dict(attn_mask=_causal, is_causal=True), dict(attn_mask=_causal, is_causal=True, need_weights=False),
    dict(key_padding_mask=_kpm, attn_mask=_random_mask, need_weights=False),
]


def _mha_pair(options, device="cpu"):
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(8, 2, dtype=torch.float64, device=device, **options)
    ours = mb.convert(stock)
    assert type(ours) is mnn.MultiheadAttention
    return ours, stock


def _mha_inputs(options, calls, self_attention, batched, device="cpu"):
    L, S, N = 4, 5, 3
    if self_attention:
        S = L
    batch_first = options.get("batch_first", False)

    def shaped(T, E=8):
        if not batched:
            return torch.randn(T, E, dtype=torch.float64, device=device)
        return torch.randn((N, T, E) if batch_first else (T, N, E), dtype=torch.float64, device=device)

    q = shaped(L)
    k = q if self_attention else shaped(S, options.get("kdim", 8))
    v = q if self_attention else shaped(S, options.get("vdim", 8))
    kwargs = {name: (value(L, S, N) if callable(value) else value) for name, value in calls.items()}
    if not batched and "key_padding_mask" in kwargs:
        kwargs["key_padding_mask"] = kwargs["key_padding_mask"][0]
    kwargs = {name: (value.to(device) if isinstance(value, torch.Tensor) else value) for name, value in kwargs.items()}
    return q, k, v, kwargs


def _mha_run(module, q, k, v, kwargs, self_attention):
    q = leaf(q)
    k, v = (q, q) if self_attention else (leaf(k), leaf(v))
    torch.manual_seed(1)  # the same dropout masks for both
    out, weights = module(q, k, v, **kwargs)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)).sum()
    if weights is not None:
        loss = loss + weights.nan_to_num().square().sum()
    wrt = [q] + ([] if self_attention else [k, v]) + list(module.parameters())
    return out, weights, torch.autograd.grad(loss, wrt, allow_unused=True)


@pytest.mark.parametrize("calls", MHA_CALLS, ids=lambda c: "-".join(c) or "default")
@pytest.mark.parametrize("options", MHA_OPTIONS, ids=lambda o: "-".join(o) or "default")
def test_multihead_attention_parity(options, calls):
    """Outputs, (averaged) weights, input and every parameter gradient equal torch's; in training and eval,
    self- and cross-attention, batched and unbatched."""
    ours, stock = _mha_pair(options)
    tol = FLOAT64  # dropout on too: the backward's m / (1 − p) is built in float64
    variants = [(True, True, True), (False, True, False), (True, False, True), (False, False, False)]
    for self_attention, batched, training in variants:
        if "kdim" in options and self_attention or "attn_mask" in calls and not self_attention:
            continue
        ours.train(training)
        stock.train(training)
        q, k, v, kwargs = _mha_inputs(options, calls, self_attention, batched)
        o1, w1, g1 = _mha_run(ours, q, k, v, kwargs, self_attention)
        o2, w2, g2 = _mha_run(stock, q, k, v, kwargs, self_attention)
        torch.testing.assert_close(o1, o2, **FLOAT64)
        assert (w1 is None) == (w2 is None)
        if w1 is not None:
            torch.testing.assert_close(w1, w2, **FLOAT64)
        for a, b in zip(g1, g2, strict=True):
            if b is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_fully_padded_sequence_like_torch(need_weights):
    """A sequence whose every key is padding: NaN through the softmax path (need_weights), zeros through SDPA."""
    ours, stock = _mha_pair({})
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    kpm = torch.zeros(2, 4, dtype=torch.bool)
    kpm[1] = True
    o1, w1 = ours(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    o2, w2 = stock(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    torch.testing.assert_close(o1, o2, equal_nan=True)
    assert o2[:, 1].isnan().all() == need_weights and o1[:, 1].isnan().all() == need_weights


def test_multihead_attention_runs_our_rules_only():
    ours, _ = _mha_pair(dict(add_bias_kv=True))
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    out, weights = ours(x, x, x)
    nodes = rule_nodes(out)
    assert nodes == {"LinearBackward": 2, "AttentionBackward": 1}
    stock_math = {"MmBackward0", "BmmBackward0", "BaddbmmBackward0", "SoftmaxBackward0", "AddmmBackward0",
                  "ScaledDotProductFlashAttentionForCpuBackward0"}
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        assert node.name() not in stock_math, node.name()
        stack += [n for n, _ in node.next_functions]


def test_multihead_attention_is_a_drop_in():
    ours, stock = _mha_pair(dict(kdim=6, vdim=7, add_bias_kv=True))
    assert isinstance(ours, nn.MultiheadAttention) and repr(ours) == repr(stock)
    assert list(ours.state_dict()) == list(stock.state_dict())
    overridden = {k for k, v in vars(mnn.MultiheadAttention).items() if callable(v) and not k.startswith("__")}
    assert overridden == {"forward"}
    assert _parameters(mnn.MultiheadAttention.forward) == _parameters(nn.MultiheadAttention.forward)
    report = mb.report(ours)
    assert report.manual_parameters == sum(p.numel() for p in ours.parameters())
    assert type(mb.restore(ours).out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("calls", [{}, dict(need_weights=False, key_padding_mask=_kpm)], ids=["weights", "kpm"])
def test_multihead_attention_cuda(calls):
    ours, stock = _mha_pair({}, device="cuda")
    q, k, v, kwargs = _mha_inputs({}, calls, True, True, device="cuda")
    o1, w1, g1 = _mha_run(ours, q, k, v, kwargs, True)
    o2, w2, g2 = _mha_run(stock, q, k, v, kwargs, True)
    torch.testing.assert_close(o1, o2, **FLOAT64)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **FLOAT64)


# ------------------------------------------------------------- Transformer layers


def _layer_parity(stock, args, kwargs=None, expect=("LinearBackward", "AttentionBackward")):
    """Outputs and every gradient equal torch's, in float64 to FLOAT64's tolerance. Layers train with
    attention dropout on by default: its backward's m / (1 − p) must be float64 too."""
    ours = mb.convert(stock)
    kwargs = kwargs or {}
    ours_args = [leaf(a) if a.is_floating_point() else a for a in args]
    stock_args = [leaf(a) if a.is_floating_point() else a for a in args]
    torch.manual_seed(2)
    out = ours(*ours_args, **kwargs)
    torch.manual_seed(2)
    ref = stock(*stock_args, **kwargs)
    torch.testing.assert_close(out, ref, **FLOAT64)
    nodes = rule_nodes(out)
    assert set(expect) <= set(nodes), nodes
    upstream = torch.randn_like(ref)
    float_ours = [a for a in ours_args if a.is_floating_point()]
    float_stock = [a for a in stock_args if a.is_floating_point()]
    g1 = torch.autograd.grad(out, float_ours + list(ours.parameters()), upstream)
    g2 = torch.autograd.grad(ref, float_stock + list(stock.parameters()), upstream)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, **FLOAT64)
    return ours, nodes


LAYER_OPTIONS = [
    dict(),
    dict(activation="gelu", norm_first=True),
    dict(activation=TF.gelu, batch_first=True),
    dict(activation=nn.SiLU()),
    dict(dropout=0.2, batch_first=True),
]


@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=lambda o: "-".join(f"{k}" for k in o) or "default")
def test_encoder_layer(options):
    torch.manual_seed(0)
    stock = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dtype=torch.float64, **options)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    kpm = torch.tensor([[False, False, False, True]] * 3) if options.get("batch_first") else None
    activation = options.get("activation", "relu")
    node = {"relu": "ReLUBackward", "gelu": "GELUBackward", TF.gelu: "GELUBackward"}.get(activation, "SiLUBackward")
    ours, _ = _layer_parity(stock, [x], dict(src_key_padding_mask=kpm), ("LinearBackward", "AttentionBackward", node))
    assert type(ours) is mnn.TransformerEncoderLayer and type(ours.self_attn) is mnn.MultiheadAttention


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer(norm_first):
    torch.manual_seed(0)
    stock = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dtype=torch.float64, norm_first=norm_first)
    tgt, memory = torch.randn(5, 2, 8, dtype=torch.float64), torch.randn(4, 2, 8, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    ours, nodes = _layer_parity(stock, [tgt, memory], dict(tgt_mask=causal, tgt_is_causal=True),
                                ("LinearBackward", "AttentionBackward", "ReLUBackward"))
    assert nodes["AttentionBackward"] == 2
    assert type(ours) is mnn.TransformerDecoderLayer


def test_transformer():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="enable_nested_tensor is True"):  # torch's own note on batch_first=False
        stock = nn.Transformer(8, 2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=16, dropout=0.1,
                               dtype=torch.float64)
    src, tgt = torch.randn(6, 2, 8, dtype=torch.float64), torch.randn(5, 2, 8, dtype=torch.float64)
    ours, nodes = _layer_parity(stock, [src, tgt], dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)))
    assert nodes["AttentionBackward"] == 2 + 2 and nodes["ReLUBackward"] == 3
    rows = {row.type for row in mb.report(ours).manual}
    assert {"manual_backprop.nn.TransformerEncoderLayer", "manual_backprop.nn.TransformerDecoderLayer"} <= rows


def test_fast_path_never_takes_over_and_inference_agrees_with_it():
    """torch's encoder layer takes its fused inference path in eval under no_grad; ours always runs the rules.
    With gradients wanted in eval, our graph holds our nodes; under no_grad, our numbers equal the fast path's."""
    torch.manual_seed(0)
    stock = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).eval()
    ours = mb.convert(stock)
    x = torch.randn(3, 4, 8)
    out = ours(x.requires_grad_())
    assert {"AttentionBackward", "LinearBackward", "ReLUBackward"} <= set(rule_nodes(out))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), stock(x), **FLOAT32)  # stock: torch._transformer_encoder_layer_fwd


def test_layer_with_an_activation_function_we_lack_stays_stock_children_convert():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, activation=lambda z: z * torch.sigmoid(1.7 * z))
    report = mb.report(mb.convert(layer))
    assert report.row("").status == "stock" and "has no manual rule" in report.row("").reason
    assert report.row("self_attn").status == report.row("linear1").status == "manual"


def test_layer_drop_ins():
    for ours_cls, stock_cls in [(mnn.TransformerEncoderLayer, nn.TransformerEncoderLayer),
                                (mnn.TransformerDecoderLayer, nn.TransformerDecoderLayer)]:
        overridden = {k for k, v in vars(ours_cls).items() if callable(v) and not k.startswith("__")}
        assert overridden == {"forward"} and issubclass(ours_cls, stock_cls)
        assert _parameters(ours_cls.forward) == _parameters(stock_cls.forward)


def test_saves_only_what_the_requested_gradients_need():
    q, k, v = (torch.randn(2, 3, 4) for _ in range(3))
    out = SDPA_OURS(q, k, v.requires_grad_())  # only ∂V: needs P, not Q, K or V
    saved_q, saved_k, saved_v, P, keep = out.grad_fn.saved_tensors
    assert saved_q is None and saved_k is None and saved_v is None and P is not None and keep is None
    out = SDPA_OURS(q.requires_grad_(), k, v.detach())  # ∂Q = ∂S K·scale: needs K and V (for ∂P), not Q
    saved_q, saved_k, saved_v, _, _ = out.grad_fn.saved_tensors
    assert saved_q is None and saved_k is not None and saved_v is not None


def test_multihead_attention_under_autocast_and_compile():
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(8, 2, batch_first=True)
    ours = mb.convert(stock)
    x = torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, wa = ours(x, x, x)
        b, wb = stock(x, x, x)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    out, _ = compiled(x, x, x, need_weights=False)
    torch.testing.assert_close(out, stock(x, x, x, need_weights=False)[0], **FLOAT32)
    out.sum().backward()
    stock(x, x, x, need_weights=False)[0].sum().backward()
    torch.testing.assert_close(ours.in_proj_weight.grad, stock.in_proj_weight.grad, **FLOAT32)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # torch's, on its fast path
def test_encoder_inference_with_nested_tensors_still_runs():
    """In eval under no_grad, TransformerEncoder packs padded batches into nested tensors for torch's fast
    path; a converted layer hands those to torch's forward (no gradient is wanted there) and agrees."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    stock = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    ours = mb.convert(stock)
    assert type(ours.layers[0]) is mnn.TransformerEncoderLayer
    x = torch.randn(3, 5, 8)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[0, 3:] = True
    with torch.no_grad():
        a, b = ours(x, src_key_padding_mask=kpm), stock(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(a, b, **FLOAT32)
    out = ours.train()(x, src_key_padding_mask=kpm)  # with gradients: our rules
    assert "AttentionBackward" in rule_nodes(out)
