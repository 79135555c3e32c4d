"""scripts/bench_per_sample.py --quick: every contender that runs agrees on the norms, and the table prints."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_runs_and_contenders_agree(capsys):
    spec = importlib.util.spec_from_file_location("bench_per_sample", ROOT / "scripts" / "bench_per_sample.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for model in ("mlp", "transformer block", "cnn"):
        for contender in ("ours materialize", "ours norms only", "opacus hooks", "torch.func vmap(grad)"):
            assert any(line.startswith(f"| {model}") and f"| {contender} | " in line and "n/a |" not in line.split("|")[3]
                       for line in out.splitlines()), (model, contender)
