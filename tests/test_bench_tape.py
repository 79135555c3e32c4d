"""scripts/bench_tape.py on small networks: it runs every contender and reports ratios, not a speed."""

from __future__ import annotations


import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def bench_tape():
    return load_script("bench_tape")


@pytest.mark.slow
def test_quick_run_reports_every_contender(bench_tape, tmp_path, capsys):
    out = tmp_path / "tape.md"
    assert bench_tape.main(["--quick", "--device", "cpu", "--samples", "1", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| cpu |")]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.split("|")[3:-1]]
        assert len(cells) == 2 * len(bench_tape.CONTENDERS) - 1 and all(float(c) > 0 for c in cells)
    assert "ns per parametric rule call" in out.read_text()


def test_stubbed_keep_is_restored(bench_tape):
    """The "no observe" contender swaps observe.keep for one step and always puts it back."""
    import torch

    from manual_backprop import observe

    keep = observe.keep
    model, x = bench_tape.networks("cpu", quick=True)[0][1:]
    contenders = bench_tape.steps(model, x)
    contenders["no observe"]()
    assert observe.keep is keep
    tape, step = contenders["tape norm"]
    with tape:
        step()
    assert len(tape.steps) == 1 and torch.isfinite(tape.delta["layers.0"])
