"""The model-comparison benchmark runs end to end on the bundled sample (small folds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLE


@pytest.mark.slow
def test_quality_bench_compares_models_on_the_same_folds(tmp_path: Path) -> None:
    table = tmp_path / "quality.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "quality.py"),
            "--data",
            str(SAMPLE / "labelled.csv.gz"),
            str(SAMPLE / "holdout.csv.gz"),
            "--folds",
            "2",
            "--models",
            "lightgbm,xgboost,catboost,blend",
            "--feature-sets",
            "raw,all",
            "--json",
            str(table),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(table.read_text())["rows"]
    # the first-input baseline, 3 models x 2 feature sets, and a blend per feature set
    assert len(rows) == 1 + 3 * 2 + 2
    assert {r["model"] for r in rows} == {"lightgbm", "xgboost", "catboost", "blend"}
    for r in rows:
        assert 0.8 < r["roc_auc"] < 1.0, r
        assert 0.0 < r["average_precision"] < 1.0
        assert r["recall_top_1%"] <= r["recall_top_2%"] <= r["recall_top_5%"]
    assert "| lightgbm | all | all inputs |" in result.stdout
