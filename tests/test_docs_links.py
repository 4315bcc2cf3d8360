"""The documentation's relative links and images point at files (and headings) that exist.

Checks README.md, CHANGELOG.md and every docs/*.md: each ``[text](path)``, ``![alt](path)`` and reference
definition ``[label]: path`` outside code blocks and code spans must name an existing file or folder relative to
its page; a ``path.md#anchor`` must also name a heading of that page by its GitHub slug. External links
(``http(s)://``, ``mailto:`` and other URI schemes) and in-page ``#anchor`` links are not checked. Also keeps the
README within its length limit. Plain text processing only: nothing from the package is imported.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)")
# [text](target) and ![alt](target); the text may hold one level of brackets, e.g. [a [b] c](target).
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"
    r"\(\s*(?:<([^>]*)>|([^)\s]+))(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"
)
_REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(?:<([^>]*)>|(\S+))")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HTML_TAG = re.compile(r"<[^>]+>")


def documentation_pages() -> list[Path]:
    """README.md, CHANGELOG.md and docs/*.md, as far as they exist."""
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [page for page in pages if page.is_file()]


def prose_lines(text: str, strip_code_spans: bool = True) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks, by default with inline code spans removed."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            continue
        if fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
            continue
        lines.append((number, _CODE_SPAN.sub("", line) if strip_code_spans else line))
    return lines


def extract_links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link, image and reference definition outside code."""
    links: list[tuple[int, str]] = []
    for number, line in prose_lines(text):
        definition = _REFERENCE_DEFINITION.match(line)
        if definition:
            links.append((number, definition.group(1) or definition.group(2)))
            continue
        links.extend((number, match.group(1) or match.group(2)) for match in _INLINE_LINK.finditer(line))
    return links


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: rendered text, lower case, punctuation and symbols dropped, spaces to -."""
    text = _INLINE_LINK.sub(lambda m: re.sub(r"^!?\[(.*)\]\(.*\)$", r"\1", m.group(0)), heading)
    text = _HTML_TAG.sub("", text).strip().lower()
    kept = [ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LNM"]
    return "".join(kept).replace(" ", "-")


def heading_slugs(text: str) -> set[str]:
    """Slugs of all headings of a page, with GitHub's -1, -2, ... suffixes for repeated headings."""
    slugs: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(text, strip_code_spans=False):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        if slug in seen:
            seen[slug] += 1
            slugs.add(f"{slug}-{seen[slug]}")
        else:
            seen[slug] = 0
            slugs.add(slug)
    return slugs


def broken_links(text: str, page_dir: Path, page_name: str, root: Path = ROOT) -> list[str]:
    """One message per relative link of ``text`` whose file or heading is missing."""
    problems: list[str] = []
    for number, target in extract_links(text):
        if not target or target.startswith("#") or _URI_SCHEME.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part.split("?", 1)[0])
        resolved = (root / path_part.lstrip("/")) if path_part.startswith("/") else (page_dir / path_part)
        where = f"{page_name}:{number}: link ({target})"
        if not resolved.exists():
            problems.append(f"{where}: file {path_part} does not exist (looked for {os.path.normpath(resolved)})")
            continue
        if anchor and resolved.is_file() and resolved.suffix.lower() == ".md":
            slugs = heading_slugs(resolved.read_text(encoding="utf-8"))
            if unquote(anchor) not in slugs:
                problems.append(
                    f"{where}: {path_part} has no heading with the anchor #{anchor} "
                    f"(its anchors: {', '.join(sorted(slugs)) or 'none'})"
                )
    return problems


def test_documentation_pages_exist():
    names = [page.relative_to(ROOT).as_posix() for page in documentation_pages()]
    assert "README.md" in names, "README.md is missing"
    assert "CHANGELOG.md" in names, "CHANGELOG.md is missing"
    assert any(name.startswith("docs/") for name in names), "no docs/*.md pages found"


@pytest.mark.parametrize("page", documentation_pages(), ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path):
    problems = broken_links(page.read_text(encoding="utf-8"), page.parent, page.relative_to(ROOT).as_posix())
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_length():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, more than {README_MAX_LINES}: move details to a page under docs/"
    )


def test_checker_reports_broken_links(tmp_path: Path):
    """The checker itself: it must flag a missing file and a missing heading, and nothing else here."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n\n## Speed and memory: `fp32` (2×)\n\n## Notes\n\n## Notes\n", encoding="utf-8"
    )
    (tmp_path / "docs" / "chart.png").write_bytes(b"")
    text = "\n".join(
        [
            "# Title",
            '[fine](docs/page.md) and ![chart](docs/chart.png "a chart") and [folder](docs/)',
            "[heading](docs/page.md#speed-and-memory-fp32-2) [repeated](docs/page.md#notes-1)",
            "[web](https://example.com/x.md) [mail](mailto:someone@example.com) [here](#title)",
            "[gone](docs/missing.md) and ![gone too](docs/missing.png)",
            "[bad anchor](docs/page.md#no-such-heading)",
            "`[in code](docs/also_missing.md)`",
            "```",
            "[in a block](docs/block_missing.md)",
            "```",
            "[ref]: docs/ref_missing.md",
        ]
    )
    problems = broken_links(text, tmp_path, "example.md", root=tmp_path)
    assert len(problems) == 4, "\n".join(problems)
    assert "example.md:5: link (docs/missing.md)" in problems[0] and "does not exist" in problems[0]
    assert "docs/missing.png" in problems[1]
    assert "#no-such-heading" in problems[2] and "example.md:6" in problems[2]
    assert "docs/ref_missing.md" in problems[3]


def test_github_slugs():
    assert github_slug("Real defects: ELPV solar cells") == "real-defects-elpv-solar-cells"
    assert github_slug("Speed vs anomalib's `Dsr` (fp32, 256×256)") == "speed-vs-anomalibs-dsr-fp32-256256"
    assert github_slug("[Linked](x.md) heading") == "linked-heading"
    assert github_slug("Phase 1 – the general VQ-VAE") == "phase-1--the-general-vq-vae"
