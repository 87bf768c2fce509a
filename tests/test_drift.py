"""Drift: PSI, KS and chi-square per feature, the report, and the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backorder.contract import FEATURE_COLUMNS
from backorder.data import load_rows
from backorder.drift import DriftFiles, check_and_report, compare, drift_metrics, numeric_bins, psi
from tests.conftest import SAMPLE, SHARED_10PCT, SHARED_20PCT, needs_shared, run_cli


@pytest.fixture(scope="module")
def sample_rows():
    rows, _, _ = load_rows(SAMPLE / "labelled.csv.gz", 8 << 20)
    return rows


def test_psi_is_zero_for_identical_and_grows_with_the_shift() -> None:
    counts = np.array([10, 20, 30, 40])
    assert psi(counts, counts) == 0
    assert 0 < psi(counts, np.array([12, 20, 30, 38])) < psi(counts, np.array([40, 30, 20, 10]))


def test_missing_values_get_their_own_bin(sample_rows) -> None:
    ref, cur = numeric_bins(sample_rows["lead_time"], sample_rows["lead_time"].fillna(1.0))
    assert cur[-1] == 0
    assert ref[-1] == sample_rows["lead_time"].isna().sum() > 0
    assert ref.sum() == len(sample_rows)


def test_a_shifted_feature_is_found_and_the_rest_are_not(sample_rows) -> None:
    half = len(sample_rows) // 2
    reference, current = sample_rows.iloc[:half], sample_rows.iloc[half:].copy()
    same = compare(reference, current)
    assert same.drifted == [] and same.features["psi"].max() < 0.05
    current["national_inv"] = current["national_inv"] * 5 + 50
    rng = np.random.default_rng(0)
    current.loc[rng.random(len(current)) < 0.4, "deck_risk"] = 1.0
    shifted = compare(
        reference,
        current,
        reference_probability=rng.random(half),
        current_probability=rng.random(len(current)) ** 2,
    )
    assert set(shifted.drifted) == {"national_inv", "deck_risk", "predicted probability"}
    assert shifted.features.iloc[0]["psi"] >= shifted.features.iloc[-1]["psi"]  # sorted
    text = generate_latest(drift_metrics(shifted, "2026-11-28T00:00:00Z")).decode()
    assert 'backorder_drift_features_drifted{batch="2026-11-28T00:00:00Z"} 3' in text
    assert text.count("backorder_drift_psi{") == len(FEATURE_COLUMNS) + 1


def test_a_batch_label_with_quote_backslash_and_newline_round_trips(
    sample_rows, tmp_path: Path
) -> None:
    """drift.prom is Prometheus text a parser reads back: label values are escaped."""
    batch = 'odd "batch" \\ name\nline two'
    half = len(sample_rows) // 2
    check_and_report(
        sample_rows.iloc[:half],
        sample_rows.iloc[half:],
        DriftFiles(tmp_path, batch, ("reference", "current")),
        threshold=0.2,
    )
    families = {
        f.name: f for f in text_string_to_metric_families((tmp_path / "drift.prom").read_text())
    }
    psi_samples = families["backorder_drift_psi"].samples
    assert len(psi_samples) == len(FEATURE_COLUMNS)
    assert {s.labels["batch"] for s in psi_samples} == {batch}
    [drifted] = families["backorder_drift_features_drifted"].samples
    assert drifted.labels == {"batch": batch} and drifted.value == 0


def test_drift_command_writes_report_figures_and_metrics(tmp_path: Path) -> None:
    result = run_cli(
        "drift",
        "--reference",
        str(SAMPLE / "labelled.csv.gz"),
        "--current",
        str(SAMPLE / "new_batch.csv.gz"),
        "--output",
        str(tmp_path / "drift"),
        home=tmp_path / "home",
    )
    assert result.returncode == 0, result.stderr
    assert "drifted (PSI >= 0.2): none" in result.stdout
    summary = json.loads((tmp_path / "drift" / "drift.json").read_text())
    assert summary["current_rows"] == 10_000 and summary["rejected"]["current"] == 1  # footer
    assert len(summary["features"]) == len(FEATURE_COLUMNS)
    report = (tmp_path / "drift" / "drift_report.html").read_text()
    assert report.count("<img") >= 2
    missing = run_cli(
        "drift",
        "--reference",
        "nope.csv",
        "--current",
        str(SAMPLE / "new_batch.csv.gz"),
        "--output",
        str(tmp_path / "x"),
        home=tmp_path / "home",
    )
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "nope.csv" in missing.stderr


@needs_shared
def test_the_two_shared_samples_barely_differ() -> None:
    """Both come from the same training file (the 20 % sample from its first 62 %): the report
    ranks the features, and none moves by more than a small PSI."""
    a, _, _ = load_rows(SHARED_10PCT, 8 << 20)
    b, _, _ = load_rows(SHARED_20PCT, 8 << 20)
    result = compare(a, b)
    assert result.drifted == []
    assert result.features["psi"].max() < 0.05
    assert result.features["ks"].max() > 0  # differences exist, and are measured
