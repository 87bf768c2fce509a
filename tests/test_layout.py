"""The package's layering, read from the source: imports between backorder modules form no
cycle, and database access is reached only through the I/O seam (``backorder.io``)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "backorder"
# The seam and what lies below it; everyone else asks backorder.io.
MAY_IMPORT_DATABASES = {"backorder.io", "backorder.databases", "backorder.uris"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the backorder modules it imports, at top level or inside functions alike."""
    modules = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from backorder import x`` imports the submodule x when there is one.
                imported.update(
                    f"{node.module}.{alias.name}"
                    if f"{node.module}.{alias.name}" in modules
                    else node.module
                    for alias in node.names
                )
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def test_the_import_graph_is_read() -> None:
    graph = import_graph()
    assert {"backorder.io", "backorder.databases", "backorder.contract"} <= set(graph)
    assert "backorder.databases" in graph["backorder.io"]
    assert "backorder.contract" in graph["backorder.databases"]


def test_backorder_modules_import_each_other_without_a_cycle() -> None:
    try:
        tuple(TopologicalSorter(import_graph()).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_only_the_io_seam_imports_databases() -> None:
    importers = {m for m, imported in import_graph().items() if "backorder.databases" in imported}
    assert importers <= MAY_IMPORT_DATABASES, "import these from backorder.io instead"


# The fitted pipeline is used through model.Scorer / LoadedModel, never taken apart by hand.
PIPELINE_SURGERY = ("steps[0]", "steps[-1]", "classifier_of(")
PRIVATE_CLASSIFIER = ("._fit_booster", "._lgb_params", "._set_fitted", "._path_cache")


def _sources(root: Path, skip: str) -> list[tuple[Path, str]]:
    return [
        (p, p.read_text(encoding="utf-8")) for p in sorted(root.rglob("*.py")) if p.name != skip
    ]


@pytest.mark.parametrize("needle", PIPELINE_SURGERY + PRIVATE_CLASSIFIER)
def test_no_code_outside_model_takes_the_pipeline_apart(needle: str) -> None:
    roots = [PACKAGE, PACKAGE.parents[1] / "bench", PACKAGE.parents[1] / "dags"]
    found = [
        f"{path.name}:{number}"
        for root in roots
        for path, text in _sources(root, skip="model.py")
        for number, line in enumerate(text.splitlines(), 1)
        if needle in line
    ]
    assert not found, f"{needle!r} outside model.py: {found}"


def test_no_prometheus_text_is_written_by_hand() -> None:
    """Exposition lines (``# TYPE``/``# HELP``) come from prometheus_client, which escapes
    label values; none are spelled out in the package."""
    found = [
        f"{path.name}:{number}"
        for path, text in _sources(PACKAGE, skip="")
        for number, line in enumerate(text.splitlines(), 1)
        if "# TYPE " in line or "# HELP " in line
    ]
    assert not found, found
