"""The parity tools: assert_grad_parity for users' pytest, and the manual-backprop-parity command."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from manual_backprop import parity_cli, rules
from manual_backprop.registry import Registry
from manual_backprop.testing import _compare, assert_grad_parity, grad_parity


class SlightlyWrongLinear(rules.Linear):
    """Our Linear rule with ∂J/∂W off by 0.1%: the kind of bug parity tools exist to catch."""

    @staticmethod
    def backward(ctx, delta):
        grad_a, grad_W, grad_b = rules.Linear.backward(ctx, delta)
        return grad_a, None if grad_W is None else grad_W * 1.001, grad_b


class WrongLinear(nn.Linear):
    def forward(self, input):
        return SlightlyWrongLinear.apply(input, self.weight, self.bias)


def _wrong_registry() -> Registry:
    registry = Registry(builtins=True)
    registry.register(nn.Linear, WrongLinear, override=True)
    return registry


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Dropout(0.3), nn.Linear(5, 3)).double()


def _data():
    return torch.randn(6, 4, dtype=torch.float64), torch.randint(3, (6,))


def test_parity_passes_and_returns_the_table():
    x, y = _data()
    model = _mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = assert_grad_parity(model, x, y, nn.CrossEntropyLoss())  # dropout: both runs draw the same mask
    assert [r.name for r in result.rows] == [
        "loss", "output[0]", "grad input[0]", "grad 0.weight", "grad 0.bias", "grad 3.weight", "grad 3.bias"
    ]
    assert result.ok and result.rule_nodes["LinearBackward"] == 2 and result.rule_nodes["CrossEntropyBackward"] == 1
    assert result.conversion.row("2").status == "manual"  # Dropout: our rule draws torch's mask from the same seed
    assert "grad 3.weight" in str(result) and "OK" in str(result)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # caller's model untouched
    assert all(p.grad is None for p in model.parameters())


def test_a_wrong_gradient_is_named_with_its_errors():
    x, y = _data()
    with pytest.raises(AssertionError) as error:
        assert_grad_parity(_mlp(), x, y, nn.CrossEntropyLoss(), registry=_wrong_registry())
    message = str(error.value)
    assert "grad 0.weight (5, 4): max abs err" in message and "grad 3.weight (3, 5)" in message
    assert "max rel err 1.000e-03" in message
    assert "grad 0.bias" not in message and "loss" not in message  # only the wrong tensors are named


def test_tolerances_are_honoured():
    x, y = _data()
    assert_grad_parity(_mlp(), x, y, nn.CrossEntropyLoss(), registry=_wrong_registry(), rtol=2e-3, atol=0)


def test_nothing_converted_cannot_pass():
    model = nn.Sequential(nn.InstanceNorm1d(3, affine=True))  # no rule for it
    with pytest.raises(AssertionError, match="no manual rule ran"):
        assert_grad_parity(model, torch.randn(3, 4), None, lambda out, _: out.pow(2).sum())


def test_parity_through_the_mode_with_a_functional_loss():
    x, y = _data()
    result = assert_grad_parity(_mlp(), x, y, nn.functional.cross_entropy, via="manual_functions")
    assert result.routed == {"linear": 2, "relu": 1, "dropout": 1, "cross_entropy": 1}
    assert result.conversion is None
    with pytest.raises(ValueError, match="via must be one of"):
        grad_parity(_mlp(), x, y, nn.functional.cross_entropy, via="magic")


def test_several_inputs_and_integer_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.lin = nn.Linear(3, 2)

        def forward(self, a, ids):
            return self.lin(a + self.embed(ids))

    result = assert_grad_parity(TwoInputs(), (torch.randn(4, 3), torch.tensor([0, 1, 4, 2])), torch.randn(4, 2), nn.MSELoss())
    assert "grad input[0]" in [r.name for r in result.rows] and "grad input[1]" not in [r.name for r in result.rows]
    assert "grad embed.weight" in [r.name for r in result.rows]


INF = float("inf")


@pytest.mark.parametrize(
    "manual, stock, max_abs, max_rel, ok",
    [
        ([0.0, 0.0], [0.0, 0.0], 0.0, 0.0, True),  # zero on both sides: equal
        ([0.0, -0.0], [-0.0, 0.0], 0.0, 0.0, True),
        ([3e-17, 1.0], [0.0, 1.0], 3e-17, 0.0, True),  # rounding noise where stock is exactly 0: zero on both sides
        ([3e-17, 1.0], [-2e-17, 1.0], 5e-17, 0.0, True),
        ([1e-3, 1.0], [0.0, 1.0], 1e-3, INF, False),  # stock 0, ours not: a real mismatch
        ([0.0, 1.0], [1e-3, 1.0], 1e-3, 1.0, False),
        ([1.001, 2.0], [1.0, 2.0], 1e-3, 1e-3, False),
        ([float("nan"), INF, -INF], [float("nan"), INF, -INF], 0.0, 0.0, True),  # equal non-finite values
    ],
)
def test_relative_error_of_zeros(manual, stock, max_abs, max_rel, ok):
    row = _compare("grad b", torch.tensor(manual, dtype=torch.float64), torch.tensor(stock, dtype=torch.float64), None, None)
    assert (row.max_abs, row.max_rel, row.ok) == (pytest.approx(max_abs, rel=1e-6), pytest.approx(max_rel, rel=1e-6), ok)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_a_gradient_zero_in_exact_arithmetic_is_reported_equal(dtype, seed):
    # ∂J/∂b of a Linear before a BatchNorm is 0 (the norm removes the mean): rounding noise on both sides,
    # and on some seeds exactly 0 on one side only.
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).to(dtype)
    result = assert_grad_parity(model, torch.randn(6, 4, dtype=dtype), torch.randint(3, (6,)), nn.CrossEntropyLoss())
    (bias,) = [r for r in result.rows if r.name == "grad 0.bias"]
    assert bias.ok and bias.max_rel == 0.0 and bias.max_abs < 1e-6
    assert "inf" not in str(result)


# ------------------------------------------------------------------- the CLI

FACTORY = """
    import torch
    from torch import nn

    def make(hidden=5, classes=3):
        return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, a, b):
            return torch.sigmoid(self.lin(a) + self.lin(b))

    instance = make()
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "parity_factories.py").write_text(textwrap.dedent(FACTORY))
    (tmp_path / "parity_imports_nothing_x5.py").write_text("import nosuch_dependency_x5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "parity_factories"
    sys.modules.pop("parity_factories", None)


@pytest.mark.parametrize(
    "args",
    [
        ["parity_factories:make", "--input-shape", "6,4", "--loss", "ce"],
        ["parity_factories:make", "--kwargs", '{"hidden": 7, "classes": 2}', "--input-shape", "3x5x4", "--loss", "mse"],
        ["parity_factories:make", "--input-shape", "6,4", "--loss", "bce-logits", "--dtype", "float32"],
        ["parity_factories:instance", "--input-shape", "6,4", "--loss", "ce", "--via", "manual_functions"],
        ["parity_factories:Pair", "--input-shape", "6,4", "--input-shape", "6,4", "--loss", "bce"],
    ],
)
def test_cli_prints_the_table_and_exits_zero(factory_module, capsys, args):
    assert parity_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "max abs err" in out and "grad input[0]" in out and out.rstrip().endswith("OK")
    assert "FAIL" not in out


def test_cli_exits_nonzero_when_gradients_differ(factory_module, capsys):
    assert parity_cli.main(["parity_factories:make", "--input-shape", "6,4", "--registry", "feedback_alignment"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FeedbackLinearBackward" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["no_colon", "--input-shape", "2,4"], "pkg.module:factory"),
        (["parity_factories:missing", "--input-shape", "2,4"], "missing"),
        (["parity_factories:make", "--input-shape", "2,a"], "input shape"),
        (["parity_factories:make", "--input-shape", "2,4", "--kwargs", "[1]"], "JSON object"),
        (["parity_factories:instance", "--input-shape", "2,4", "--kwargs", "{\"hidden\": 2}"], "module instance"),
        (["parity_factories:make", "--input-shape", "2,4", "--registry", "nosuch"],
         "no rule set named 'nosuch'; available: ['batchwise_random_sign_symmetry', 'direct_feedback_alignment', "
         "'feedback_alignment', 'fixed_random_sign_symmetry', 'sign_symmetry']"),
        (["parity_factories:make", "--input-shape", "2,4", "--loss", "bce"],
         "--loss bce takes probabilities in [0, 1], but the model's outputs lie in"),
        (["parity_factories:make", "--input-shape", "2,5"], "the model fails on random inputs of shape 2,5: "),
        (["nowhere/models.py:make", "--input-shape", "2,4"], "no such file: nowhere/models.py (looked for /"),
        (["nowhere/models:make", "--input-shape", "2,4"], "a file path ends in .py, got 'nowhere/models'"),
        (["nosuch_module_x3:make", "--input-shape", "2,4"],
         "no module named 'nosuch_module_x3' on sys.path or in the current folder ("),
        (["parity_factories:make.nope", "--input-shape", "2,4"], "parity_factories.py) has no attribute 'make.nope'"),
        (["parity_imports_nothing_x5:make", "--input-shape", "2,4"],
         "module parity_imports_nothing_x5 was found, but importing it failed: No module named 'nosuch_dependency_x5'"),
    ],
)
def test_cli_usage_errors(factory_module, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        parity_cli.main(args)
    err = capsys.readouterr().err
    last = err.rstrip("\n").splitlines()[-1]  # argparse's usage line, then the error alone
    assert exit_.value.code == 2 and last.startswith("manual-backprop-parity: error: ") and message in last, err


# A user's models file that imports a module beside it, and is named like a module of the standard library.
SIBLING = "WIDTH = 5\n"
IMPORTS_ITS_SIBLING = """
    from torch import nn
    from parity_sibling_x4 import WIDTH

    def make():
        return nn.Sequential(nn.Linear(4, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 3))
"""


@pytest.fixture
def models_elsewhere(tmp_path, monkeypatch):
    """models/json.py (importing models/parity_sibling_x4.py), run from the folder elsewhere/."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "parity_sibling_x4.py").write_text(SIBLING)
    (tmp_path / "models" / "json.py").write_text(textwrap.dedent(IMPORTS_ITS_SIBLING))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path / "models" / "json.py"
    sys.modules.pop("parity_sibling_x4", None)


@pytest.mark.parametrize("relative", [True, False], ids=["relative", "absolute"])
def test_cli_takes_a_file_path_from_another_folder(models_elsewhere, capsys, relative):
    import json

    path = os.path.join("..", "models", "json.py") if relative else str(models_elsewhere)
    path_before = list(sys.path)
    assert parity_cli.main([f"{path}:make", "--input-shape", "6,4", "--loss", "ce"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")
    assert sys.modules["json"] is json  # the file loaded under a name of its own: it shadows nothing
    assert sys.path == path_before  # its folder was on sys.path only while it loaded


def test_cli_names_the_file_whose_import_fails(models_elsewhere, capsys):
    (models_elsewhere.parent / "parity_sibling_x4.py").unlink()
    with pytest.raises(SystemExit) as exit_:
        parity_cli.main([f"{models_elsewhere}:make", "--input-shape", "6,4"])
    last = capsys.readouterr().err.rstrip("\n").splitlines()[-1]
    assert exit_.value.code == 2
    assert last == f"manual-backprop-parity: error: importing {models_elsewhere} ({models_elsewhere}) failed: No module named 'parity_sibling_x4'"


def test_cli_takes_the_file_path_of_a_class_instance_and_factory(tmp_path, capsys):
    (tmp_path / "my_models_x2.py").write_text(textwrap.dedent(FACTORY))
    for target in ("make", "instance", "Pair"):
        shapes = ["--input-shape", "6,4"] * (2 if target == "Pair" else 1)
        assert parity_cli.main([f"{tmp_path / 'my_models_x2.py'}:{target}", *shapes, "--loss", "mse"]) == 0
        assert capsys.readouterr().out.rstrip().endswith("OK")


@pytest.mark.parametrize("where", ["module in the current folder", "file path from another folder"])
def test_console_script(tmp_path, where):
    # As a user runs it: the console script, from the folder the user is in, nothing of theirs on PYTHONPATH
    # (only this checkout, so the script runs the code under test).
    (tmp_path / "parity_factories.py").write_text(textwrap.dedent(FACTORY))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "parity_sibling_x4.py").write_text(SIBLING)
    (tmp_path / "models" / "json.py").write_text(textwrap.dedent(IMPORTS_ITS_SIBLING))
    (tmp_path / "elsewhere").mkdir()
    if where == "module in the current folder":  # imports as under `python -m`
        cwd, target = tmp_path, "parity_factories:make"
    else:
        cwd, target = tmp_path / "elsewhere", os.path.join("..", "models", "json.py") + ":make"
    script = os.path.join(os.path.dirname(sys.executable), "manual-backprop-parity")
    env = {**os.environ, "PYTHONPATH": str(Path(parity_cli.__file__).resolve().parents[1])}
    done = subprocess.run([script, target, "--input-shape", "4,4"], capture_output=True, text=True, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert "grad 2.weight" in done.stdout and done.stdout.rstrip().endswith("OK")
