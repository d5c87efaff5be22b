"""Documentation: every relative link in README.md and docs/*.md names a file that
exists in this repository, and the README stays short and links every page."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 250

# A fence line opens or closes a fenced code block (up to 3 spaces of indent).
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# An inline code span: a run of backticks, then anything up to the same run.
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
# [text](target) or ![alt](target), with an optional title; text may wrap lines.
INLINE_LINK = re.compile(
    r"!?\[[^\]]*\]\(\s*(<[^>\n]*>|[^)\s]+)(?:\s+(?:\"[^\"\n]*\"|'[^'\n]*'|\([^)\n]*\)))?\s*\)"
)
# [label]: target (a reference definition).
REFERENCE = re.compile(r"^ {0,3}\[[^\]\n]+\]:[ \t]*(<[^>\n]*>|\S+)", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
IGNORED_SCHEMES = ("http:", "https:", "mailto:")


def _without_code(text: str) -> str:
    """``text`` with fenced blocks and code spans blanked out, newlines kept, so
    offsets still give line numbers and links inside code are not links."""
    lines, fence = [], ""
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = ""
            lines.append("")
        elif m:
            fence = m.group(1)
            lines.append("")
        else:
            lines.append(line)
    return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), "\n".join(lines))


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition."""
    plain = _without_code(text)
    found = [(m.start(1), m.group(1)) for m in INLINE_LINK.finditer(plain)]
    found += [(m.start(1), m.group(1)) for m in REFERENCE.finditer(plain)]
    return sorted((plain.count("\n", 0, at) + 1, target.strip("<>")) for at, target in found)


def broken_links(page: Path, root: Path) -> list[str]:
    """``page:line: target (why)`` for each relative link that does not name an
    existing file or directory inside ``root``. Web links and #anchors are skipped."""
    problems = []
    for line, target in links(page.read_text()):
        if target.startswith("#") or target.lower().startswith(IGNORED_SCHEMES):
            continue
        where = f"{page.relative_to(root)}:{line}: {target}"
        if SCHEME.match(target) or target.startswith("/"):
            problems.append(f"{where} (not a relative link)")
            continue
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        resolved = (page.parent / path).resolve()
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{where} (outside the repository)")
        elif not resolved.exists():
            problems.append(f"{where} (no such file)")
    return problems


def test_there_are_pages_to_check() -> None:
    assert README.is_file()
    assert len(PAGES) >= 5, f"expected docs/*.md pages, found {PAGES}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_name_existing_files(page: Path) -> None:
    problems = broken_links(page, ROOT)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_short_and_self_contained() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, (
        f"README.md has {len(text.splitlines())} lines; reference material goes to docs/"
    )
    assert "../shared" not in text, "README.md refers to ../shared, which a clone does not have"
    for page in PAGES:
        targets = [target for _, target in links(page.read_text())]
        assert not [t for t in targets if "../shared" in t or "DESIGN.md" in t], page


def test_readme_links_every_docs_page() -> None:
    linked = {
        (README.parent / target.split("#", 1)[0]).resolve()
        for _, target in links(README.read_text())
        if not target.startswith("#") and not SCHEME.match(target)
    }
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link docs/{unlinked}"


def test_the_checker_reports_what_is_broken_and_only_that(tmp_path: Path) -> None:
    (tmp_path / "code.py").write_text("")
    (tmp_path / "repo").mkdir()
    page = tmp_path / "repo" / "docs.md"
    (tmp_path / "repo" / "here.md").write_text("")
    page.write_text(
        "# Page\n"
        "[fine](here.md) and [fine too](here.md#part) [anchor](#page)\n"
        "[web](https://example.com/x.md) ![image](missing.png)\n"
        '`[in a span](nowhere.md)` and [a\nwrapped text](gone.md "title")\n'
        "```\n[in a fence](absent.md)\n```\n"
        "[escapes](../code.py) [absolute](/etc/hosts)\n"
        "[ref]: <also-missing.md>\n"
    )
    assert broken_links(page, tmp_path / "repo") == [
        "docs.md:3: missing.png (no such file)",
        "docs.md:5: gone.md (no such file)",
        "docs.md:9: ../code.py (outside the repository)",
        "docs.md:9: /etc/hosts (not a relative link)",
        "docs.md:10: also-missing.md (no such file)",
    ]
