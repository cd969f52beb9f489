"""Issue 18, item 5: docs a person can navigate. The README is short and links every page of docs/
(directly or through the docs index it links); every relative link in the README, docs/ and
bench/README.md points at a file that exists, and at a heading there where it names one."""

from __future__ import annotations

import re
from pathlib import Path

from markdown_it import MarkdownIt

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
INDEX = DOCS / "README.md"
PAGES = [README, REPO / "bench" / "README.md", *sorted(DOCS.glob("*.md"))]
MARKDOWN = MarkdownIt("commonmark").enable("table")


def tokens(path: Path):
    """Every token of the page, inline children included (links in tables and lists too; code is not parsed)."""
    for token in MARKDOWN.parse(path.read_text()):
        yield token
        yield from token.children or ()


def links(path: Path) -> list[str]:
    """The href of every link on the page, reference-style links resolved, in order."""
    return [token.attrGet("href") for token in tokens(path) if token.type == "link_open"]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of the page's headings; a repeated heading gets -1, -2... as on GitHub."""
    found: set[str] = set()
    parsed = MARKDOWN.parse(path.read_text())
    for opening, inline in zip(parsed, parsed[1:]):
        if opening.type == "heading_open":
            text = "".join(child.content for child in inline.children if child.type in ("text", "code_inline"))
            base, anchor, count = slug(text), slug(text), 0
            while anchor in found:
                count += 1
                anchor = f"{base}-{count}"
            found.add(anchor)
    return found


def relative_targets(path: Path) -> list[tuple[str, Path, str]]:
    """(href, file, anchor) of each link on the page that stays in the repository."""
    targets = []
    for href in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", href):  # https:, mailto: ...
            continue
        file, _, anchor = href.partition("#")
        targets.append((href, (path.parent / file).resolve() if file else path, anchor))
    return targets


def test_every_docs_page_is_linked_from_the_readme_or_its_index():
    """Each docs/*.md page is linked from README.md, or from docs/README.md, which README.md links."""
    from_readme = {target for _, target, _ in relative_targets(README)}
    assert INDEX in from_readme, "README.md does not link docs/README.md"
    reachable = from_readme | {target for _, target, _ in relative_targets(INDEX)}
    unlinked = [str(page.relative_to(REPO)) for page in sorted(DOCS.glob("*.md"))
                if page != INDEX and page not in reachable]
    assert unlinked == [], f"not linked from README.md or docs/README.md: {unlinked}"


def test_every_relative_link_resolves_to_a_file_and_heading():
    """Every relative link in README.md, bench/README.md and docs/*.md names a file that exists and,
    where it has a #fragment, a heading of that file."""
    broken = []
    for page in PAGES:
        for href, target, anchor in relative_targets(page):
            where = f"{page.relative_to(REPO)}: ({href})"
            if not target.exists():
                broken.append(f"{where}: no file {target}")
            elif anchor and (target.suffix != ".md" or anchor not in anchors(target)):
                broken.append(f"{where}: no heading #{anchor} in {target.relative_to(REPO)}")
    assert broken == [], "\n".join(broken)


def test_each_docs_page_opens_with_a_title_and_what_it_is_for():
    """Each docs page starts with a '# ' title followed by a paragraph, before any section, code or table."""
    for page in sorted(DOCS.glob("*.md")):
        blocks = [(token.type, token.tag) for token in MARKDOWN.parse(page.read_text()) if token.level == 0]
        assert blocks[:3] == [("heading_open", "h1"), ("heading_close", "h1"), ("paragraph_open", "p")], page.name


def test_readme_stays_a_short_page():
    """README.md is an overview of at most about 250 lines; the rest lives in docs/."""
    assert len(README.read_text().splitlines()) <= 260
