"""Bad input: a clear error naming the offending shape or value, before any math runs."""

import re

import pytest
import torch

import manual_backprop
import manual_backprop.functional as MF
from manual_backprop import InputError, TargetIndexError
from tests.cases import CUDA

f32, f64 = torch.float32, torch.float64


def t(*shape, dtype=f32, requires_grad=False):
    return torch.rand(*shape, dtype=dtype, requires_grad=requires_grad)


def idx(*values):
    return torch.tensor(values)


# (call, error type, regex the message must match: it names the offending shapes or values)
BAD_INPUTS = {
    "linear_in_features": (lambda: MF.linear(t(3, 5), t(4, 6)), InputError, r"in_features=6.*\(3, 5\).*\(4, 6\)"),
    "linear_weight_1d": (lambda: MF.linear(t(3, 5), t(5)), InputError, r"2-D.*\(5,\)"),
    "linear_bias_shape": (lambda: MF.linear(t(3, 5), t(4, 5), t(3)), InputError, r"\(4,\).*\(3,\)"),
    "linear_mixed_dtypes": (lambda: MF.linear(t(3, 5, dtype=f64), t(4, 5)), InputError, r"input=torch.float64, weight=torch.float32"),
    "mse_not_broadcastable": (lambda: MF.mse_loss(t(3, 2), t(4)), InputError, r"\(3, 2\).*\(4,\)"),
    "bce_mixed_dtypes": (lambda: MF.binary_cross_entropy(t(3), t(3, dtype=f64)), InputError, r"input=torch.float32, target=torch.float64"),
    "mse_weight_shape": (lambda: MF.mse_loss(t(3, 2), t(3, 2), weight=t(2)), InputError, r"\(3, 2\).*\(2,\)"),
    "mse_bad_reduction": (lambda: MF.mse_loss(t(3), t(3), reduction="avg"), InputError, r"'avg'"),
    "bce_target_shape": (lambda: MF.binary_cross_entropy(t(3), t(4)), InputError, r"\(4,\).*\(3,\)"),
    "bce_above_one": (lambda: MF.binary_cross_entropy(torch.tensor([0.5, 1.5]), t(2)), InputError, r"\[0, 1\].*1\.5.*\(1,\)"),
    "bce_below_zero": (lambda: MF.binary_cross_entropy(torch.tensor([[0.5], [-0.25]]), t(2, 1)), InputError, r"-0\.25.*\(1, 0\)"),
    "bce_nan": (lambda: MF.binary_cross_entropy(torch.tensor([float("nan")]), t(1)), InputError, r"nan"),
    "bce_weight_requires_grad": (lambda: MF.binary_cross_entropy(t(3), t(3), weight=t(3, requires_grad=True)), InputError, r"weight requires grad"),
    "bce_logits_target_shape": (lambda: MF.binary_cross_entropy_with_logits(t(3), t(3, 1)), InputError, r"\(3, 1\).*\(3,\)"),
    "bce_logits_pos_weight_shape": (lambda: MF.binary_cross_entropy_with_logits(t(3, 4), t(3, 4), pos_weight=t(5)), InputError, r"pos_weight.*\(5,\).*\(3, 4\)"),
    "ce_index_too_large": (lambda: MF.cross_entropy(t(3, 4), idx(0, 4, 1)), TargetIndexError, r"\[0, 4\).*\b4\b.*\(1,\)"),
    "ce_index_negative": (lambda: MF.cross_entropy(t(3, 4), idx(0, -1, 1)), TargetIndexError, r"-1 at index \(1,\)"),
    "ce_index_2d": (lambda: MF.cross_entropy(t(2, 4, 3), idx([0, 1, 7], [0, 0, 0])), TargetIndexError, r"7 at index \(0, 2\)"),
    "ce_batch_mismatch": (lambda: MF.cross_entropy(t(3, 4), idx(0, 1)), InputError, r"\(3,\).*\(3, 4\).*\(2,\)"),
    "ce_int32_target": (lambda: MF.cross_entropy(t(3, 4), idx(0, 1, 2).int()), InputError, r"torch.int32"),
    "ce_soft_target_shape": (lambda: MF.cross_entropy(t(3, 4), t(3, 5)), InputError, r"\(3, 4\).*\(3, 5\)"),
    "ce_weight_shape": (lambda: MF.cross_entropy(t(3, 4), idx(0, 1, 2), weight=t(3)), InputError, r"\(4,\).*\(3,\)"),
    "ce_label_smoothing": (lambda: MF.cross_entropy(t(3, 4), idx(0, 1, 2), label_smoothing=1.5), InputError, r"1\.5"),
    "ce_mixed_dtypes": (lambda: MF.cross_entropy(t(3, 4), idx(0, 1, 2), weight=t(4, dtype=f64)), InputError, r"float64"),
    "ce_scalar_input": (lambda: MF.cross_entropy(torch.tensor(1.0), idx(0)), InputError, r"0-d"),
    "gelu_approximate": (lambda: MF.gelu(t(3), approximate="fast"), InputError, r"'fast'"),
    "softmax_dim": (lambda: MF.softmax(t(3, 4), dim=2), InputError, r"dim=2.*\(3, 4\)"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_named(name):
    call, error, pattern = BAD_INPUTS[name]
    with pytest.raises(error) as info:
        call()
    assert re.search(pattern, str(info.value)), str(info.value)


# Where torch's kernel promotes mixed dtypes, so do we (same result dtype); where it refuses, we refuse above.
PROMOTING = {
    "mse_f32_f64": lambda F: F.mse_loss(t(3, 2), t(3, 2, dtype=f64)),
    "mse_f64_f32_weight": lambda F: F.mse_loss(t(3, 2, dtype=f64), t(3, 2), weight=t(3, 2)),
    "mse_int_target": lambda F: F.mse_loss(t(3, 2), torch.ones(3, 2, dtype=torch.long)),
    "bce_weight_f64": lambda F: F.binary_cross_entropy(t(3, 2), t(3, 2), weight=t(2, dtype=f64)),
    "bce_logits_f32_f64": lambda F: F.binary_cross_entropy_with_logits(t(3, 2), t(3, 2, dtype=f64)),
    "bce_logits_pos_weight_f32": lambda F: F.binary_cross_entropy_with_logits(t(3, 2, dtype=f64), t(3, 2, dtype=f64), pos_weight=t(2)),
    "bce_logits_weight_f64": lambda F: F.binary_cross_entropy_with_logits(t(3, 2), t(3, 2), weight=t(2, dtype=f64)),
    "ce_soft_f64_target": lambda F: F.cross_entropy(t(3, 2), t(3, 2, dtype=f64)),
}


@pytest.mark.parametrize("name", PROMOTING)
def test_mixed_dtypes_promote_where_torch_does(name):
    import torch.nn.functional as TF

    torch.manual_seed(0)
    stock = PROMOTING[name](TF)
    torch.manual_seed(0)
    ours = PROMOTING[name](MF)
    assert ours.dtype == stock.dtype
    torch.testing.assert_close(ours, stock)


def test_errors_are_catchable_as_torch_raises_them():
    """torch raises RuntimeError, ValueError or IndexError for these; ours are all of those it could be."""
    with pytest.raises(RuntimeError):
        MF.linear(t(3, 5), t(4, 6))
    with pytest.raises(ValueError):
        MF.binary_cross_entropy(t(3), t(4))
    with pytest.raises(IndexError):
        MF.cross_entropy(t(3, 4), idx(0, 9, 1))


def test_ignore_index_is_not_an_error():
    loss = MF.cross_entropy(t(3, 4), idx(0, -100, 3))
    assert torch.isfinite(loss)
    loss = MF.cross_entropy(t(3, 4), idx(0, 7, 3), ignore_index=7)
    assert torch.isfinite(loss)


def test_value_checks_under_compile_use_a_device_assert():
    compiled = torch.compile(MF.binary_cross_entropy, backend="eager", fullgraph=True)
    assert torch.isfinite(compiled(t(3), t(3)))
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):
        compiled(torch.tensor([0.5, 2.0, 0.5]), t(3))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_no_host_sync_on_cuda_hot_path():
    """Value checks on CUDA go through a device-side assert: nothing in forward or backward syncs."""
    x = torch.rand(64, 8, device="cuda", requires_grad=True)
    W = torch.randn(3, 8, device="cuda", requires_grad=True)
    y = torch.randint(0, 3, (64,), device="cuda")
    p = torch.rand(64, 3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z = MF.linear(MF.sigmoid(x), W)
        loss = MF.cross_entropy(z, y) + MF.binary_cross_entropy(MF.sigmoid(z), p) + MF.mse_loss(z, p)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_debug_switch_names_the_value_on_cuda():
    with manual_backprop.debug_checks():
        with pytest.raises(TargetIndexError, match=r"\b9 at index \(1,\)"):
            MF.cross_entropy(torch.rand(3, 4, device="cuda"), torch.tensor([0, 9, 1], device="cuda"))


def test_debug_switch_is_scoped():
    from manual_backprop._checks import debug_checks_enabled

    assert not debug_checks_enabled()
    with manual_backprop.debug_checks():
        assert debug_checks_enabled()
    assert not debug_checks_enabled()
