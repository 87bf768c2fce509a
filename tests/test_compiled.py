"""Compiled trees (lleaves): same probabilities as LightGBM, cached, and a clean fallback."""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from backorder.api_schema import SkuRecord, records_frame
from backorder.compiled import CompiledTreesUnavailable
from backorder.config import Settings
from backorder.data import load_rows
from backorder.predict import predict_file
from backorder.registry import Registry
from backorder.web import FORM_DEFAULTS, create_app
from tests.conftest import SAMPLE, run_cli


def _rows() -> pd.DataFrame:
    rows, _, _ = load_rows(SAMPLE / "new_batch.csv.gz", 8 << 20)
    return rows


def test_compiled_probabilities_equal_lightgbm_and_are_cached(
    trained_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.rmtree(trained_settings.home / "compiled", ignore_errors=True)  # start uncached
    registry = Registry(trained_settings)
    with caplog.at_level(logging.INFO, logger="backorder.compiled"):
        compiled = registry.load("champion", compiled=True)
    plain = registry.load("champion")
    assert compiled.scoring_engine == "compiled"
    assert plain.scoring_engine == "lightgbm"
    assert any(m.startswith("compiling") for m in caplog.messages)
    rows = _rows()
    p_compiled = compiled.probability(rows)
    p_plain = plain.probability(rows)
    assert np.max(np.abs(p_compiled - p_plain)) <= 1e-9
    assert p_plain.std() > 0  # a real spread of scores, not one constant

    [cached] = (trained_settings.home / "compiled").glob("*.so")
    written = cached.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="backorder.compiled"):
        registry.load("champion", compiled=True)
    assert not any(m.startswith("compiling") for m in caplog.messages)  # loaded from the cache
    assert cached.stat().st_mtime_ns == written


def test_without_lleaves_scoring_falls_back_with_one_warning(
    trained_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "lleaves", None)  # `import lleaves` raises ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = Registry(trained_settings).load("champion", compiled=True)
    ours = [w for w in caught if issubclass(w.category, CompiledTreesUnavailable)]
    assert len(ours) == 1 and "scoring with LightGBM" in str(ours[0].message)
    assert model.scoring_engine == "lightgbm"
    summary = predict_file(
        SAMPLE / "new_batch.csv.gz", tmp_path / "p.parquet", model, trained_settings
    )
    assert summary.read == summary.scored + summary.rejected


def test_cli_fallback_is_one_warning_line(trained_settings: Settings, tmp_path: Path) -> None:
    # A real import failure: an lleaves package that refuses to load, first on the path.
    broken = tmp_path / "broken" / "lleaves"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('lleaves is switched off here')\n")
    result = run_cli(
        "predict",
        "--input",
        str(SAMPLE / "new_batch.csv.gz"),
        "--output",
        str(tmp_path / "p.parquet"),
        home=trained_settings.home,
        env={"PYTHONPATH": str(broken.parent)},
    )
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warned == [
        "warning: compiled trees unavailable (ImportError: lleaves is switched off here); "
        "scoring with LightGBM"
    ]
    assert "Traceback" not in result.stderr


def test_web_app_scores_with_compiled_trees(trained_settings: Settings) -> None:
    with TestClient(create_app(trained_settings), base_url="http://127.0.0.1") as client:
        info = client.get("/v1/model").json()
        assert info["scoring_engine"] == "compiled"
        answer = client.post("/v1/predict", json={"records": [FORM_DEFAULTS]})
        assert answer.status_code == 200, answer.text
    plain = Registry(trained_settings).load("champion")
    expected = plain.pipeline.predict_proba(records_frame([SkuRecord(**FORM_DEFAULTS)]))[:, 1][0]
    got = answer.json()["predictions"][0]["backorder_probability"]
    assert abs(got - expected) <= 1e-9
