"""The README is the front door: short, and every relative link in it leads somewhere.

The pages under docs/ are checked by `mkdocs build --strict` (make docs-build, run by CI);
the README lives outside the site, so its links are checked here.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
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
