"""The README is the front door: short, and every relative link in it leads somewhere; the
layout page names every module of the package.

The pages under docs/ are checked by `mkdocs build --strict` (make docs-build, run by CI);
the README lives outside the site, so its links are checked here.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LAYOUT = ROOT / "docs" / "develop" / "layout.md"
PACKAGE = ROOT / "src" / "backorder"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(markdown: str) -> list[str]:
    return [t for t in LINK.findall(markdown) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_readme_stays_short() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200


def test_readme_links_point_to_files_that_exist() -> None:
    links = relative_links(README.read_text(encoding="utf-8"))
    assert len(links) > 10
    missing = [t for t in links if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_layout_page_has_a_line_for_every_module() -> None:
    """A module added without its line on "How the code is laid out" fails here."""
    page = LAYOUT.read_text(encoding="utf-8")
    modules = [
        p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
    ]
    assert len(modules) > 30
    missing = sorted(m for m in modules if f"| `{m}` |" not in page)
    assert not missing, f"docs/develop/layout.md has no line for: {missing}"
