"""scripts/vanishing_gradients.py, quickly: it writes its plot and table, and what it records obeys the notes."""

from __future__ import annotations

import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("vanishing_gradients")


def test_sigmoid_deltas_vanish_under_the_quarter_bound(script):
    (x, y), _ = script.digits()
    x, y = x[:256], y[:256]
    results = {a: script.train(a, (x, y), (x, y), epochs=0) for a in script.ACTIVATIONS}
    L = script.HIDDEN + 1
    sigmoid = [results["sigmoid"]["start"][f"layers.{k}"] for k in range(L)]
    bound = results["sigmoid"]["bound_start"]
    assert bound[-1] == sigmoid[-1]
    assert all(d <= b * (1 + 1e-5) for d, b in zip(sigmoid, bound))  # ‖δ(l)‖ ≤ ¼‖W(l)‖₂‖δ(l+1)‖, chained
    assert all(lower < upper / 4 for lower, upper in zip(sigmoid, sigmoid[1:]))  # shrinks at least 4× per layer here
    for other in ("tanh", "relu"):
        assert results[other]["start"]["layers.0"] > 100 * sigmoid[0]
    # the same initial weights: the output error differs only through the activations
    outputs = [results[a]["start"][f"layers.{L - 1}"] for a in script.ACTIVATIONS]
    assert max(outputs) < 1.1 * min(outputs)


@pytest.mark.slow
def test_quick_run_writes_plot_and_table(script, tmp_path, capsys):
    assert script.main(["--out", str(tmp_path), "--quick"]) == 0
    png = tmp_path / "vanishing_gradients.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    page = (tmp_path / "vanishing_gradients.md").read_text()
    assert page.startswith(script.TITLE)  # a titled page in the docs site
    table = page.removeprefix(script.TITLE).strip()
    assert table in capsys.readouterr().out
    rows = table.splitlines()
    assert len(rows) == 2 + script.HIDDEN + 1 + 1  # header, rule, one row per layer, accuracy
    assert rows[2].startswith("| δ(2) (first hidden) |") and rows[-2].startswith("| δ(10) (output) |")
    for row in rows[2:-1]:
        assert all(float(cell) > 0 for cell in row.split("|")[2:-1])
