"""What a user reads runs as written: every Python block of README.md and docs/*.md, and every link.

Conventions for the pages (README.md and docs/*.md):

- A block fenced ```python is an example a user can paste: complete, with its imports. It runs here
  as written, in a fresh namespace, with an empty temporary folder as the working directory and one
  torch thread. Shell commands are fenced ```bash (or indented), configs ```yaml: those are not run.
- ``# prints: TEXT``, at the end of a code line or on a line of its own, declares one line the block
  prints. The block's standard output must be exactly the declared lines, in order (trailing spaces
  aside); ``...`` inside TEXT stands for any text, such as an object's address. A block that declares
  nothing must print nothing.
- Training in a block is kept to a few epochs of a small dataset, so that all blocks together run in
  well under a minute.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PRINTS = "# prints: "


def python_blocks(page: Path) -> list[tuple[str, str]]:
    """(the heading above the block, the block's code) for each ```python block, in order."""
    blocks, heading, code, inside = [], "top", [], None
    for line in page.read_text().splitlines():
        if inside is None and line.startswith("```"):
            inside = line[3:].strip()
        elif inside is not None and line.startswith("```"):
            if inside == "python":
                blocks.append((heading, "\n".join(code) + "\n"))
            inside, code = None, []
        elif inside is not None:
            code.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


def block_cases():
    for page in PAGES:
        for number, (heading, code) in enumerate(python_blocks(page), 1):
            slug = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")[:40]
            yield pytest.param(code, id=f"{page.relative_to(ROOT)}:{number}:{slug}")


def declared_output(code: str) -> list[str]:
    return [line.split(PRINTS, 1)[1].rstrip() for line in code.splitlines() if PRINTS in line]


def matches(printed: str, declared: str) -> bool:
    return re.fullmatch(".*".join(map(re.escape, declared.split("..."))), printed) is not None


BLOCKS = list(block_cases())


@pytest.mark.parametrize("code", BLOCKS)
def test_python_block_runs_and_prints_what_it_declares(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a block writes (logs, checkpoints) land in a folder of its own
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "<docs block>", "exec"), {"__name__": "__docs_block__"})
    finally:
        torch.set_num_threads(threads)
    lines = [line.rstrip() for line in printed.getvalue().splitlines()]
    declared = declared_output(code)
    assert len(lines) == len(declared) and all(map(matches, lines, declared)), (
        "printed:\n" + "\n".join(lines) + "\n\ndeclared (# prints:):\n" + "\n".join(declared)
    )


def test_every_page_with_code_is_collected():
    """The pages whose examples are run: a page that gained a block, or a new page, is picked up."""
    pages = {param.id.split(":")[0] for param in BLOCKS}
    assert {"README.md", "docs/convert.md", "docs/per_sample.md", "docs/tape.md", "docs/rules.md"} <= pages
    assert len(BLOCKS) >= 13  # the collector found the blocks: a changed fence or heading style would lose them


@pytest.mark.parametrize(
    "printed, declared, ok",
    [
        ("<X object at 0x7f3a>", "<X object at 0x...>", True),
        ("torch.Size([8])", "torch.Size([8])", True),
        ("torch.Size([9])", "torch.Size([8])", False),
        ("torch.Size([8]) extra", "torch.Size([8])", False),
    ],
)
def test_declared_output_matching(printed, declared, ok):
    assert matches(printed, declared) is ok


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_points_at_a_file_that_exists():
    """Links from README.md and docs/*.md to other files of the project (the part before any #anchor);
    the Sphinx build (tests/test_docs.py) checks the anchors."""
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links inside code are code
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # https:, mailto:, or an anchor on the same page
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)


def test_readme_links_every_docs_page_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    linked = {target.split("#")[0] for target in LINK.findall(readme)}
    pages = {f"docs/{page.name}" for page in PAGES[1:] if page.name != "index.md"}  # index.md: the site, README inside
    assert pages <= linked, f"not linked from the README: {sorted(pages - linked)}"


def test_quickstart_is_the_two_commands():
    quickstart = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [line.split("#")[0].strip() for line in quickstart.splitlines() if line.startswith("    ")]
    assert commands == ["make train", "make test"]


def test_nothing_a_user_reads_speaks_of_tracker_items():
    """Docs, docstrings, comments, test names and messages speak of the library, not of how its work was
    organised: no tracker item numbers (a link to another project's tracker, as PyTorch's, is fine)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    scanned = [name for name in files if re.search(r"\.(py|md|rst|yaml|toml|cpp|txt)$|Makefile$", name)]
    assert "README.md" in scanned and {"docs/rules.md", "docs/conf.py", "docs/api.rst"} <= set(scanned)
    pattern = re.compile(r"\b[Ii]ssues? #?\d+|\bthis (round|session)\b|\bwas lent\b|\btracker item")
    found = []
    for name in scanned:
        for number, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1):
            if pattern.search(line) and "pytorch issue" not in line.lower() and "tracker item numbers" not in line:
                found.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not found, "\n".join(found)
