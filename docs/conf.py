"""Sphinx configuration: the API reference from the docstrings, and the Markdown pages of docs/
(through myst-parser) in one site. Build with `make docs` (warnings are errors)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, ahead of any installed copy

project = "manual-backprop"
author = "manual-backprop contributors"
copyright = "manual-backprop contributors"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
myst_heading_anchors = 3
autodoc_inherit_docstrings = False  # torch and Lightning docstrings are theirs, with their own cross-references
default_role = "code"  # `x` in a docstring is code, as in the Markdown pages

# The docstrings are plain text, written to read well in `help()` and in an editor: `code` spans,
# shapes such as (*, in), |x| for absolute values, indented formula blocks. reStructuredText gives
# several of those characters a meaning of its own, so before autodoc parses a docstring this hook
# marks the formula blocks as literal blocks and escapes the markup characters outside code spans.
# Nothing is hidden: a docstring that still does not parse fails the build.

CODE = re.compile(r"``(.+?)``|`([^`]+)`")  # ``code`` (reStructuredText's own) or `code`
OPENS, CLOSES = "([{<'\"-/:", ".,:;!?)]}>'\"-/\\"  # what may stand before and after inline markup
BULLET = re.compile(r"\s*(?:[-*•]|\d+\.)\s")


def _escape(text: str) -> str:
    """reStructuredText's markup characters in plain prose, escaped; `code` spans kept as code."""
    out, last = [], 0
    for match in CODE.finditer(text):
        out.append(_escape_prose(text[last : match.start()]))
        before = text[match.start() - 1] if match.start() else " "
        after = text[match.end()] if match.end() < len(text) else " "
        # inline markup must start after a space or punctuation and end before one: "\ " joins it to a word
        opens, closes = before.isspace() or before in OPENS, after.isspace() or after in CLOSES
        out.append(("" if opens else "\\ ") + f"``{match.group(1) or match.group(2)}``" + ("" if closes else "\\ "))
        last = match.end()
    out.append(_escape_prose(text[last:]))
    return "".join(out)


def _escape_prose(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("*", "\\*").replace("|", "\\|")
    return re.sub(r"(?<=\w)_(?=\W|$)", r"\\_", text)  # `name_` would be a hyperlink reference


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def plain_text_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    """Indented blocks under a paragraph become literal blocks; markup characters elsewhere are escaped."""
    out: list[str] = []
    base = 0  # the indentation of the paragraph being read (a bullet's text for its continuation lines)
    literal = None  # the indentation of the literal block being copied, or None
    for line in lines:
        if not line.strip():
            out.append(line)
            continue
        indent = _indent(line)
        if literal is not None and indent >= literal:
            out.append(line)
            continue
        if literal is not None:
            out.append("")  # a literal block ends at a blank line
            literal, base = None, indent
        if indent > base:
            out.extend(["", "::", ""])  # "::" alone: the next indented block is literal, the marker is dropped
            literal = indent
            out.append(line)
            continue
        if not (out and out[-1].strip()):
            base = indent
            bullet = BULLET.match(line)
            if bullet:
                base = bullet.end()
        out.append(_escape(line))
    lines[:] = out


def setup(app):
    app.connect("autodoc-process-docstring", plain_text_docstring)
