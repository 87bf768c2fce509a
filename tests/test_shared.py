"""Checks on the real samples in ../shared/data/backorders (skipped when it is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from backorder.data import load_labelled
from backorder.io import InputTable
from tests.conftest import SHARED_10PCT, SHARED_20PCT, needs_shared, run_cli

pytestmark = needs_shared


def test_both_layouts_validate_completely() -> None:
    data = load_labelled([SHARED_10PCT, SHARED_20PCT], block_bytes=8 << 20)
    by_file = {Path(s.uri).name: s for s in data.sources}
    a, b = by_file[SHARED_10PCT.name], by_file[SHARED_20PCT.name]
    assert (a.read, a.accepted, a.rejected) == (168_786, 168_786, 0)
    assert (b.read, b.rejected) == (209_715, 0)
    # README.txt: of file B's "distinctive" rows, 10.2 % repeat a row of file A exactly. The
    # same share is dropped here; common feature vectors (idle SKUs) repeat far more often.
    rows_b = load_labelled([SHARED_20PCT], block_bytes=8 << 20).rows
    kept_b = data.rows.index[data.rows["source"] == str(SHARED_20PCT)]
    distinctive = (
        (rows_b["national_inv"].abs() > 50)
        & (rows_b["sales_9_month"] > 50)
        & (rows_b["forecast_9_month"] > 20)
        & rows_b["perf_6_month_avg"].between(0, 1)
    )
    dropped_share = 1 - rows_b.index[distinctive].isin(kept_b).mean()
    assert 0.095 < dropped_share < 0.11
    assert b.duplicates_dropped > 0.3 * b.read
    assert (
        int(data.rows.loc[data.rows["source"] == str(SHARED_10PCT), "went_on_backorder"].sum())
        == 1_129
    )
    # The -99 sentinel (file B) and empty cells (file A) both mean "no supplier history".
    assert data.rows["perf_6_month_avg"].isna().sum() > 12_975
    assert data.rows["lead_time"].isna().sum() > 10_066


def test_preprocessed_layout_is_recognised() -> None:
    table = InputTable(SHARED_10PCT)
    assert table.format == "csv" and table.compressed and "sku" not in table.columns


@pytest.mark.slow
def test_default_training_is_good_on_the_10pct_sample(tmp_path: Path) -> None:
    """The default settings, cross-validated on real data: the bar the product promises."""
    result = run_cli(
        "train",
        "--data",
        str(SHARED_10PCT),
        "--output",
        str(tmp_path / "run"),
        home=tmp_path / "home",
        env={
            "BACKORDER_CV_FOLDS": "5",
            "BACKORDER_LIGHTGBM__LEARNING_RATE": "0.022",
            "BACKORDER_LIGHTGBM__MAX_TREES": "3000",
            "BACKORDER_LIGHTGBM__EARLY_STOPPING_ROUNDS": "200",
        },
    )
    assert result.returncode == 0, result.stderr
    metrics = pd.read_json(tmp_path / "run" / "metrics.json", typ="series")
    validation = metrics["validation"]
    assert validation["roc_auc"] > 0.93
    assert validation["average_precision"] > 0.17
    assert validation["expected_cost"] < validation["baselines"]["never_backorder"]["expected_cost"]
    assert abs(validation["expected_backorders"] - validation["n_positive"]) < 0.05 * 1_019

    # Score the raw-layout sample: every row, including those with an empty lead time.
    out = tmp_path / "scored.parquet"
    scored = run_cli(
        "predict", "--input", str(SHARED_20PCT), "--output", str(out), home=tmp_path / "home"
    )
    assert scored.returncode == 0, scored.stderr
    assert "read 209,715 rows: scored 209,715" in scored.stdout
    predictions = pd.read_parquet(out)
    raw = pd.read_csv(SHARED_20PCT, usecols=["sku", "lead_time"], dtype={"sku": str})
    missing_lead = set(raw.loc[raw["lead_time"].isna(), "sku"])
    assert len(missing_lead) == 12_954
    assert missing_lead <= set(predictions["sku"])
    assert np.isfinite(predictions["backorder_probability"]).all()
    flagged = predictions[predictions["risk_band"] != "low"]
    assert flagged["reason_1"].notna().all()
    assert predictions.loc[predictions["risk_band"] == "low", "reason_1"].isna().all()


@pytest.mark.parametrize("path", [SHARED_10PCT, SHARED_20PCT])
def test_files_stream_in_bounded_chunks(path: Path) -> None:
    table = InputTable(path, block_bytes=1 << 20)
    sizes = [len(chunk.frame) for chunk in table.chunks()]
    assert len(sizes) > 10 and max(sizes) < 20_000
