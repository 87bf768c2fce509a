"""Shared fixtures. Tests that need ../shared skip with a reason when it is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backorder.config import Settings, load_settings

pytest_plugins = ["tests.support.servers"]

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SHARED = ROOT.parent / "shared" / "data" / "backorders"
SHARED_10PCT = SHARED / "train_sample10pct_stratified.csv.gz"
SHARED_20PCT = SHARED / "train_first1048575_sample20pct.csv.gz"

# The `shared` marker: `-m "not shared"` leaves these out; without ../shared they skip.
needs_shared = pytest.mark.shared


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if SHARED_10PCT.is_file() and SHARED_20PCT.is_file():
        return
    absent = pytest.mark.skip(reason="../shared/data/backorders is not beside this checkout")
    for item in items:
        if item.get_closest_marker("shared"):
            item.add_marker(absent)


# Small, fast booster settings: tests check behaviour, not the last point of AUC.
FAST = {
    "cv_folds": 3,
    "lightgbm": {"learning_rate": 0.1, "max_trees": 300, "early_stopping_rounds": 30},
}


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("BACKORDER_") or name == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(name, raising=False)


def make_settings(home: Path, **overrides: object) -> Settings:
    return load_settings(None, home=home, **{**FAST, **overrides})


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "home")


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding one champion trained on the bundled sample (built once per session)."""
    from backorder.train import run_training

    home = tmp_path_factory.mktemp("trained")
    run_training([SAMPLE / "labelled.csv.gz"], make_settings(home), home / "training")
    return home


@pytest.fixture
def trained_settings(trained_home: Path, tmp_path: Path) -> Settings:
    """Settings pointing at a private copy of the session's trained registry."""
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    return make_settings(home)


def run_cli(
    *args: str, home: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `backorder` entry point in a subprocess, as a user would."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BACKORDER_")}
    full_env.update(
        {
            "BACKORDER_HOME": str(home),
            "BACKORDER_CV_FOLDS": "3",
            "BACKORDER_LIGHTGBM__LEARNING_RATE": "0.1",
            "BACKORDER_LIGHTGBM__MAX_TREES": "300",
            "BACKORDER_LIGHTGBM__EARLY_STOPPING_ROUNDS": "30",
        }
    )
    full_env.update(env or {})
    exe = Path(sys.executable).with_name("backorder")
    return subprocess.run(
        [str(exe), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=600,
        check=False,
    )
