"""Metrics agree with scikit-learn and with hand-computed operating points and costs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from backorder.contract import FEATURE_COLUMNS
from backorder.metrics import Costs, alert_budget_points, budget_key, evaluate_predictions


def toy(n: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = pd.DataFrame({c: rng.integers(0, 50, n).astype(float) for c in FEATURE_COLUMNS})
    rows["perf_6_month_avg"] = rng.random(n)
    y = (rng.random(n) < 0.05).astype(int)
    p = np.clip(0.03 + 0.3 * y * rng.random(n) + 0.05 * rng.random(n), 0, 1)
    return rows, y, p


def test_headline_metrics_match_sklearn() -> None:
    rows, y, p = toy()
    m = evaluate_predictions(rows, y, p, 0.1, Costs(10, 1, [0.01, 0.05])).metrics
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["average_precision"] == pytest.approx(average_precision_score(y, p))
    assert m["n_rows"] == 1000 and m["n_positive"] == y.sum()
    assert m["expected_backorders"] == pytest.approx(p.sum())
    flagged = p >= 0.1
    tp = int((flagged & (y == 1)).sum())
    assert m["recall"] == pytest.approx(tp / y.sum())
    assert m["expected_cost"] == 10 * (y.sum() - tp) + 1 * (flagged & (y == 0)).sum()
    assert m["baselines"]["never_backorder"]["expected_cost"] == 10 * y.sum()
    for key in ("recall_at_top_1pct", "recall_at_top_5pct", "brier", "log_loss", "f1"):
        assert key in m


def test_alert_budget_recall_counts_the_top_rows() -> None:
    y = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1])
    p = np.linspace(1, 0.1, 10)  # already sorted, riskiest first
    points = alert_budget_points(y, p, [0.2, 0.5])
    assert points["top_20pct"]["recall"] == pytest.approx(1 / 3)
    assert points["top_50pct"]["recall"] == pytest.approx(2 / 3)
    assert points["top_50pct"]["precision"] == pytest.approx(2 / 5)
    assert budget_key(0.025) == "top_2_5pct"


def test_segments_cover_the_planner_questions() -> None:
    rows, y, p = toy()
    rows.loc[:99, "lead_time"] = np.nan
    segments = evaluate_predictions(rows, y, p, 0.1, Costs(10, 1, [0.01])).segments.set_index(
        "segment"
    )
    assert segments.loc["lead_time missing", "rows"] == 100
    assert segments.loc["all rows", "rows"] == 1000
    for name in ("stock on hand <= 0", "no supplier history (perf -99)", "deck_risk = Yes"):
        assert name in segments.index
    assert not any(name.startswith("input ") for name in segments.index)  # one input: no split


def test_segments_split_by_input_file_when_there_are_several() -> None:
    rows, y, p = toy()
    rows["source"] = np.where(np.arange(len(rows)) < 300, "s3://b/a.csv.gz", "/data/b.parquet")
    segments = evaluate_predictions(rows, y, p, 0.1, Costs(10, 1, [0.01])).segments.set_index(
        "segment"
    )
    assert segments.loc["input a.csv.gz", "rows"] == 300
    assert segments.loc["input b.parquet", "backorders"] == y[300:].sum()
    assert segments.loc["input b.parquet", "mean_probability"] == pytest.approx(p[300:].mean())


def test_metrics_without_backorders_do_not_crash() -> None:
    rows, _, p = toy()
    m = evaluate_predictions(rows, np.zeros(len(p), int), p, 0.1, Costs(10, 1, [0.01])).metrics
    assert m["roc_auc"] is None and m["average_precision"] is None
