"""Every ```python block of README.md and docs/*.md runs as written (CPU, fresh namespace per block).

A block that needs hardware the CI does not have is marked by the line `<!-- not-run: needs ... -->` right before
its opening fence; it is skipped here (keep these few). Engineering notes (docs/dev/) are not checked.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not-run:(.*?)-->\s*$")


def python_blocks(path: pathlib.Path):
    """(line number, code, reason to skip or None) of each ```python block of a Markdown file."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            previous = lines[i - 1].strip() if i > 0 else ""
            skip = NOT_RUN.match(previous)
            blocks.append((start, "\n".join(lines[start:j]) + "\n", skip.group(1).strip() if skip else None))
            i = j + 1
        else:
            i += 1
    return blocks


CASES = [(path, line, code, skip) for path in DOCS if path.exists() for line, code, skip in python_blocks(path)]


def test_the_docs_have_python_examples():
    assert any(path.name == "README.md" for path, *_ in CASES)


@pytest.mark.parametrize(
    "path, line, code, skip", CASES, ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _, _ in CASES]
)
def test_doc_example_runs(path, line, code, skip):
    if skip:
        pytest.skip(f"not run on CPU: {skip}")
    namespace = {"__name__": f"doc_example_{path.stem}_{line}"}
    padded = "\n" * line + code  # so that a traceback gives the line number in the Markdown file
    exec(compile(padded, str(path.relative_to(ROOT)), "exec"), namespace)
