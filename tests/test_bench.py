"""scripts/bench.py on a tiny grid: its correctness (gradient check, counting, report), not its timing."""

from __future__ import annotations

import pytest
import torch

from tests.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


@pytest.mark.slow
def test_quick_run_writes_table_chart_and_targets(bench, tmp_path, capsys):
    assert bench.main(["--quick", "--device", "cpu", "--samples", "1", "--activations", "sigmoid", "--out", str(tmp_path)]) == 0
    markdown = (tmp_path / "bench.md").read_text()
    summary_rows = [line for line in markdown.split("Every case:")[0].splitlines() if line.startswith("| cpu |")]
    assert len(summary_rows) == len(bench.QUICK_GRID)
    rows = [line for line in markdown.split("Every case:")[1].split("Convolutional networks")[0].splitlines()
            if line.startswith("| cpu |")]
    contenders = bench.CONTENDERS + ["matmuls"]
    assert len(rows) == len(bench.QUICK_GRID) * len(contenders)
    assert [row.split("|")[5].strip() for row in rows[: len(contenders)]] == contenders
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert float(cells[5]) > 0 and float(cells[6]) >= 0  # step ms, × stock
        if cells[4] == "stock":
            assert cells[6] == "1.00"
    # 7 + 4 native for the MLPs, 1 for the CNN, 1 for the conv ∂J/∂W accuracy
    assert markdown.count("- met:") + markdown.count("- MISSED:") == 13
    cnn_rows = [line for line in markdown.split("Convolutional networks")[1].split("Targets:")[0].splitlines()
                if line.startswith("| cpu |")]
    assert [row.split("|")[4].strip() for row in cnn_rows] == bench.CNN_CONTENDERS * len(bench.CNN_QUICK)
    for row in cnn_rows:  # the float32 conv ∂J/∂W error column: stock's and ours, none for compiled
        error = row.split("|")[-2].strip()
        assert (error == "") == (row.split("|")[4].strip() == "compiled") and (error == "" or 0 < float(error) < 1e-3)
    accuracy = markdown.split("Convolution ∂J/∂W in float32")[1]
    assert sum(line.startswith("| nn.Conv") for line in accuracy.splitlines()) >= 12  # torch's module samples
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bench.md" in capsys.readouterr().out


@pytest.mark.slow
def test_wrong_gradients_fail_the_run(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(bench.PEER_SIGMA_PRIME, "sigmoid", lambda z: torch.sigmoid(z))  # σ' wrong on purpose
    argv = ["--quick", "--device", "cpu", "--samples", "1", "--activations", "sigmoid", "--out", str(tmp_path)]
    assert bench.main(argv) == 1


def test_saved_bytes_count_each_storage_once(bench):
    x = torch.randn(4, 8, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(3, 8))

    def forward():
        a = torch.sigmoid(x)  # saves its output a: 4·8 floats
        z = a @ weight.t()  # saves a (already counted) and weight (a parameter: left out)
        return (z * z[:, :1]).sum()  # saves z and its view z[:, :1]: one storage of 4·3 floats

    assert bench.count_saved_bytes(forward, [weight]) == (4 * 8 + 4 * 3) * 4


def test_matmul_roofline_counts_the_step_products(bench):
    stock = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 2))
    _, flops = bench.matmul_step(stock, torch.randn(16, 4))
    # layer 1: forward + grad-weight; layer 2: forward + grad-weight + grad-input
    assert flops == 2 * 16 * (4 * 8 * 2 + 8 * 2 * 3)


def test_targets_report_met_and_missed(bench):
    def case(sizes, gemm_bound, fused, saved_fused):
        c = bench.Case("cpu", sizes, 8, "relu", gemm_bound)
        c.times = {"stock": 1.0, "per-layer": 1.0, "fused": fused, "compiled": 0.5, "peers": 1.2, "matmuls": fused / 1.05,
                   "native": 0.7}
        c.saved = {"stock": 100, "per-layer": 100, "fused": saved_fused}
        return c

    good = bench.targets([case((4, 8, 1), False, 0.9, 100), case((64, 64, 10), True, 0.95, 90)])
    assert all(met for met, _ in good), good
    bad = dict((text.split(":")[1].strip(), met) for met, text in
               bench.targets([case((4, 8, 1), False, 1.2, 120), case((64, 64, 10), True, 1.0, 90)]))
    assert not bad["fused ≤ 1.00× stock, geomean over the grid"]
    assert not bad["fused ≤ 1.05× stock at every size"]
    assert not bad["saved bytes never above stock"]
    assert bad["per-layer ≤ 1.10× stock at GEMM-bound sizes"]


def test_native_targets_report_met_and_missed(bench):
    """The native rule's targets: geomean ≤ 0.80×, every size ≤ 1.00×, course sizes (≤ 64 wide) ≤ 0.75×, saved bytes ≤ stock."""
    def case(sizes, native, saved_native=100):
        c = bench.Case("cpu", sizes, 8, "relu", False)
        c.times, c.saved = {"stock": 1.0, "native": native}, {"stock": 100, "native": saved_native}
        return c

    good = bench.native_targets([case((4, 8, 1), 0.6), case((256, 512, 10), 0.9)])
    assert all(met for met, _ in good) and len(good) == 4, good
    bad = dict((text.split(":")[1].strip(), met) for met, text in
               bench.native_targets([case((4, 8, 1), 0.8, 120), case((256, 512, 10), 1.1)]))
    assert not bad["native ≤ 0.80× stock, geomean over the grid"]
    assert not bad["native ≤ 1.00× stock at every size"]
    assert not bad["native ≤ 0.75× stock at course sizes (≤ 64 wide)"]
    assert not bad["native saved bytes never above stock"]


def test_ratios_pair_contenders_within_each_round(bench):
    case = bench.Case("cpu", (4, 8, 1), 8, "relu", False)
    case.rounds = {"stock": [1.0, 2.0, 3.0], "fused": [1.5, 2.2, 9.0]}
    case.times = {name: sorted(ts)[1] for name, ts in case.rounds.items()}
    assert case.ratio("fused") == pytest.approx(1.5)  # median of 1.5, 1.1, 3.0; not 2.2 / 2.0


@pytest.mark.slow
def test_transformer_block_checks_gradients_and_reports_the_target(bench):
    lines, errors = bench.transformer_block("cpu", (8, 2, 4, 2), "aot_eager", samples=1)
    assert errors == []
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| contender")]
    assert [row.split("|")[1].strip() for row in rows] == bench.TRANSFORMER_CONTENDERS
    assert "of parameters on manual rules" in lines[0]
    targets = [line for line in lines if line.startswith("- transformer block")]
    assert len(targets) == 2 and all(("met" in t or "MISSED" in t) and "1.2×" in t for t in targets)


def test_recurrent_quick_run_reports_each_layer_and_the_targets(bench, tmp_path, monkeypatch):
    argv = ["--only", "recurrent", "--quick", "--device", "cpu", "--samples", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    markdown = (tmp_path / "bench.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| LSTM |") or line.startswith("| GRU |")]
    assert [row.split("|")[1].strip() for row in rows] == ["LSTM", "GRU"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert all(float(c) > 0 for c in cells[3:8])  # three step times, two ratios
    assert markdown.count("- native ") == 2 and "- python rule (measured): geomean" in markdown
    assert "- saved bytes met" in markdown
    import manual_backprop.rules.recurrent as recurrent

    monkeypatch.setattr(recurrent, "transport", lambda ctx, *Ws: tuple(2 * W if W is not None else None for W in Ws))
    assert bench.main(argv) == 1  # δ through 2W instead of W: the gradient check fails the run


def test_norm_layers_report_native_and_python(bench, tmp_path):
    assert bench.main(["--only", "norm", "--quick", "--device", "cpu", "--samples", "1", "--out", str(tmp_path)]) == 0
    markdown = (tmp_path / "bench.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith(("| BatchNorm", "| LayerNorm", "| GroupNorm"))]
    assert len(rows) == len(bench.NORM_QUICK)
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert all(float(c) > 0 for c in cells[2:])  # stock, native, python ms and the two ratios
    assert markdown.count("- met:") + markdown.count("- MISSED:") == 1
