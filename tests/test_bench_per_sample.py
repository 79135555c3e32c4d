"""scripts/bench_per_sample.py --quick: every contender that runs agrees on the norms, and the table prints."""

from __future__ import annotations

import pytest

from tests.scripts import load_script


@pytest.mark.slow
def test_quick_benchmark_runs_and_contenders_agree(capsys):
    bench = load_script("bench_per_sample")
    assert bench.main(["--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for model in ("mlp", "transformer block", "cnn"):
        for contender in ("ours materialize", "ours norms only", "opacus hooks", "torch.func vmap(grad)"):
            assert any(line.startswith(f"| {model}") and f"| {contender} | " in line and "n/a |" not in line.split("|")[3]
                       for line in out.splitlines()), (model, contender)
