"""The documentation site builds with warnings as errors: the API reference from the docstrings
(Sphinx autodoc) and the Markdown pages of docs/ with the README (myst-parser), as `make docs` does."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_conf():
    spec = importlib.util.spec_from_file_location("docs_conf", ROOT / "docs" / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


@pytest.mark.slow
def test_site_builds_without_warnings(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q", "-d", str(tmp_path / "doctrees"),
         str(ROOT / "docs"), str(tmp_path / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    api = (tmp_path / "html" / "api.html").read_text()
    # autodoc ran: objects of every layer, from rules up to the Lightning tasks
    for name in ("manual_backprop.convert.convert", "manual_backprop.rules.Linear", "manual_backprop.tape.Tape",
                 "manual_backprop.privacy.clip_and_noise_", "lightning_modules.tasks.RegressionTask"):  # fmt: skip
        assert f'id="{name}"' in api, name
    index = (tmp_path / "html" / "index.html").read_text()
    assert "Quickstart" in index and 'href="rules.html"' in index  # the README, its links turned into pages'
    for page in ("rules", "convert", "lightning", "per_sample", "tape", "beyond_backprop", "native", "benchmarks"):
        assert (tmp_path / "html" / f"{page}.html").exists(), page


# The docstrings are plain text; conf.py's hook hands reStructuredText what they mean.
@pytest.mark.parametrize(
    "docstring, expected",
    [
        # shapes and |x| are prose, not emphasis or substitutions
        (["Input: (*, in), |x| ≤ 1."], ["Input: (\\*, in), \\|x\\| ≤ 1."]),
        # `code` spans become literals, joined to a following word without a space
        (["`linear`'s rule, `Tensor`s"], ["``linear``'s rule, ``Tensor``\\ s"]),
        # reStructuredText's own ``code`` stays one literal; a trailing underscore is no link
        (["``torch.nn.Linear`` and clip_and_noise_ here"], ["``torch.nn.Linear`` and clip_and_noise\\_ here"]),
        # an indented formula under a paragraph is a literal block, copied as written
        (["The rule:", "    δ = W*a", "after"], ["The rule:", "", "::", "", "    δ = W*a", "", "after"]),
        # a bullet's continuation lines are text, not a literal block
        (["- one *", "  two"], ["- one \\*", "  two"]),
    ],
)
def test_plain_text_docstrings_become_restructuredtext(docstring, expected):
    lines = list(docstring)
    load_conf().plain_text_docstring(None, "function", "f", None, {}, lines)
    assert lines == expected
