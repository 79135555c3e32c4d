"""scripts/learning_rules.py --quick: every rule trains both networks and the table and plot are written."""

from __future__ import annotations

import pytest

from tests.scripts import load_script


@pytest.mark.slow
def test_quick_run_writes_the_table_and_plot(tmp_path, capsys):
    script = load_script("learning_rules")
    assert script.main(["--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "learning_rules.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    assert [row.split("`")[1] for row in rows] == [rule for rule, _ in script.RULES]
    assert (tmp_path / "learning_rules.png").stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out
