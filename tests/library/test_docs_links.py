"""Every relative link and picture of README.md, docs/**/*.md and experiments/**/*.md points to a file that
exists, and every `#anchor` into a Markdown file names one of its headings (GitHub's heading ids). Links inside code
are not links."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "experiments").rglob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The Markdown without fenced blocks and inline code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_ids(path: pathlib.Path) -> set[str]:
    """GitHub's ids of a page's headings: lower case, punctuation but '-' and '_' dropped, spaces as '-', repeats
    numbered -1, -2, ..."""
    ids, seen = set(), {}
    for line in _prose(path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(base, 0)
            seen[base] = n + 1
            ids.add(base if n == 0 else f"{base}-{n}")
    return ids


def broken_links(page: pathlib.Path) -> list[str]:
    """'target (why)' for each relative link of a page whose file or heading does not exist."""
    bad = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-zA-Z][a-zA-Z+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in heading_ids(file):
            bad.append(f"{target} (no such heading)")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert not broken_links(page), broken_links(page)


def test_the_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# A heading, with punctuation\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading-with-punctuation) [ok](other.md#twice-1) ![pic](gone.png) [x](other.md#nope)\n"
        "`[code](ignored.md)` [web](https://example.com/x.md)\n"
    )
    assert broken_links(page) == ["gone.png (no such file)", "other.md#nope (no such heading)"]
