"""The README's Python examples run as written and print what their comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def python_block_after(heading: str) -> str:
    section = README[README.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_example_runs_and_prints_our_grad_fn():
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(python_block_after("## Example"), {})
    assert re.fullmatch(r"<torch\.autograd\.function\.LinearBackward object at 0x[0-9a-f]+>\n", printed.getvalue())
    assert "<torch.autograd.function.LinearBackward object at 0x...>" in python_block_after("## Example")


def test_convert_restore_report_example_runs_as_its_comments_say():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    names = {"model": model}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(python_block_after("### convert, restore, report"), names)
    assert type(names["model"][0]) is torch.nn.Linear  # restored: stock classes
    assert names["model"] is not model  # convert and restore return copies; the user's model is untouched
    assert names["rows"][0]["status"] == "container" and names["rows"][1]["status"] == "manual"
    assert set(names["rows"][0]) == {"name", "type", "status", "parameters", "reason"}  # the keys the comment names


def test_per_sample_example_runs_as_its_comments_say():
    printed = io.StringIO()
    names: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(python_block_after("## Per-sample gradients and private training (DP-SGD)"), names)
    assert printed.getvalue() == "torch.Size([8, 4, 5])\ntorch.Size([8])\n"
    assert names["model"][0].weight.grad.shape == (4, 5)


def test_recurrent_example_runs_and_prints_what_its_comment_says():
    block = python_block_after("### Recurrent layers")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(block, {})
    expected = re.search(r"# (\S+ \S+)\n", block).group(1)
    assert printed.getvalue().strip() == expected == "manual_backprop.nn.recurrent True"


def test_nothing_a_user_reads_speaks_of_tracker_items():
    """Docs, docstrings, comments, test names and messages speak of the library, not of how its work was
    organised: no tracker item numbers (a link to another project's tracker, as PyTorch's, is fine)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\b[Ii]ssues? \d+|\bthis round\b|\bwas lent\b")
    found = []
    for name in files:
        if not re.search(r"\.(py|md|yaml|toml|cpp|txt)$|Makefile$", name):
            continue
        for number, line in enumerate((root / name).read_text(errors="replace").splitlines(), 1):
            if pattern.search(line) and "pytorch issue" not in line.lower():
                found.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not found, "\n".join(found)
