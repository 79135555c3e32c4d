"""scripts/mnist1d_tables.py at a few steps a run: the three tables are written, every number from a real run."""

from __future__ import annotations

import json
import math

import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist1d")
    script = load_script("mnist1d_tables")
    rows = ["logistic:backprop", "mlp:backprop", "cnn:backprop", "mlp:feedback_alignment", "cnn:sign_symmetry",
            "mlp:dp:1", "mlp:dp:8"]
    args = ["--quick", "--out", str(out), "--seeds", "0", "1", "--workers", "1"]
    assert script.main(args + [a for row in rows for a in ("--row", row)]) == 0
    return script, out, json.loads((out / "runs_quick.json").read_text())


@pytest.mark.slow
def test_every_run_trains_and_tests_on_our_rules(tables):
    script, out, runs = tables
    for key in ("mlp:backprop@0", "mlp:backprop@1", "cnn:sign_symmetry@0"):
        assert 5 < runs[key]["accuracy"] <= 100, runs[key]
    assert runs["mlp:backprop@0"]["accuracy"] != runs["mlp:backprop@1"]["accuracy"]  # the seed matters
    assert 0 <= runs["mlp:feedback_alignment@0"]["angle"] <= 180
    assert runs["mlp:backprop@0"]["angle"] == pytest.approx(0, abs=1e-3)  # backprop against itself


@pytest.mark.slow
def test_dp_rows_take_sigma_from_the_accountant_and_spend_the_epsilon_asked_for(tables):
    from opacus.accountants import PRVAccountant

    script, out, runs = tables
    for epsilon in (1, 8):
        run = runs[f"mlp:dp:{epsilon}@0"]
        reference = PRVAccountant()
        reference.history = [(run["sigma"], 100 / 4000, script.QUICK["steps"])]
        assert run["epsilon"] == pytest.approx(reference.get_epsilon(script.DELTA), rel=1e-6)
        assert run["epsilon"] <= epsilon * 1.01 and run["epsilon"] >= epsilon * 0.9
    assert runs["mlp:dp:1@0"]["sigma"] > runs["mlp:dp:8@0"]["sigma"]


@pytest.mark.slow
def test_the_docs_page_holds_the_three_tables(tables, tmp_path):
    script, out, runs = tables
    script.write_docs(runs, [0, 1], tmp_path, script.QUICK, 12.0)
    page = (tmp_path / "mnist1d.md").read_text()
    for heading in ("## 1. The published table, reproduced", "## 2. Learning rules", "## 3. DP-SGD"):
        assert heading in page
    mean = (runs["cnn:backprop@0"]["accuracy"] + runs["cnn:backprop@1"]["accuracy"]) / 2
    assert f"| cnn | 94 | 92.3 | {mean:.1f} ± " in page
    assert "--row mlp:backprop --seeds 0 1" in page
    assert (tmp_path / "mnist1d.png").stat().st_size > 10_000
    assert not math.isnan(mean)
