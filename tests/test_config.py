"""Settings: environment over YAML over defaults, and one-line errors for bad values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from backorder.config import load_settings
from backorder.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_documented_example_config_loads(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "guide" / "configuration.md").read_text(encoding="utf-8")
    example = re.search(r"```yaml\n# settings.yaml\n(.*?)```", page, re.S)
    assert example is not None
    path = tmp_path / "settings.yaml"
    path.write_text(example.group(1))
    settings = load_settings(path)
    assert settings.home == Path("/var/lib/backorder")
    assert settings.lightgbm.max_depth == 8 and settings.lightgbm.min_child_samples == 20


def test_environment_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("cost_missed_backorder: 20\nlightgbm: {num_leaves: 15}\n")
    monkeypatch.setenv("BACKORDER_COST_MISSED_BACKORDER", "30")
    settings = load_settings(path)
    assert settings.cost_missed_backorder == 30
    assert settings.lightgbm.num_leaves == 15
    assert settings.bayes_threshold == pytest.approx(1 / 31)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alert_budgets: [0.01, 2]\n", "alert_budgets must be shares"),
        ("no_such_setting: 1\n", "setting 'no_such_setting'"),
        ("cost_false_alarm: [1\n", "not valid YAML"),
        ("- a list\n", "expected a mapping"),
        ("derived_features: [stock_positon]\n", "derived_features: unknown stock_positon"),
        ("scoring_base_rate: 1.5\n", "setting 'scoring_base_rate'"),
    ],
)
def test_bad_settings_name_the_file_and_setting(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_settings(path)
    assert str(path) in str(error.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_tracking_uri_defaults_to_sqlite_in_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(None, home=tmp_path)
    assert settings.resolved_tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert load_settings(None, home=tmp_path).resolved_tracking_uri == "http://127.0.0.1:5000"
