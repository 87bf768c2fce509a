"""MkDocs hooks (mkdocs.yml `hooks:`): the data-contract page gets its table from the code.

The table is `backorder contract`'s output, rendered from the same `ColumnSpec` list the
validation uses, so the page cannot drift from the code and nobody copies it by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# This checkout's code, not whichever `backorder` the environment has installed.
SRC = Path(__file__).resolve().parent.parent / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from backorder.contract import contract_markdown  # noqa: E402

CONTRACT_PAGE = "guide/data-contract.md"
MARKER = "<!-- backorder contract: the table, put here by docs/hooks.py at build time -->"


def render_contract_page(markdown: str) -> str:
    """The contract page's Markdown with the generated table in place of the marker."""
    if markdown.count(MARKER) != 1:
        raise ValueError(f"docs/{CONTRACT_PAGE}: needs the contract marker exactly once: {MARKER}")
    return markdown.replace(MARKER, contract_markdown().rstrip("\n"))


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri == CONTRACT_PAGE:
        return render_contract_page(markdown)
    return markdown
