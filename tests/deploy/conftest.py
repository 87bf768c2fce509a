"""The deployment files (compose, Dockerfile, workflows, Prometheus, Grafana, Terraform).

Every test below this folder carries the ``deploy`` marker: ``pytest -m deploy`` runs only
them, ``pytest -m "not deploy"`` only the product's own tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.deploy)
