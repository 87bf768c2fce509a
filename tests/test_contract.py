"""The data contract: what is accepted, what is rejected and with which reason."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from backorder.contract import (
    FEATURE_COLUMNS,
    FLAG_COLUMNS,
    LABEL,
    NUMERIC_COLUMNS,
    contract_markdown,
    validate_chunk,
)

ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "sku": "1043",
    "national_inv": "12",
    "lead_time": "8.0",
    "in_transit_qty": "0",
    "forecast_3_month": "30",
    "forecast_6_month": "60",
    "forecast_9_month": "90",
    "sales_1_month": "9",
    "sales_3_month": "28",
    "sales_6_month": "55",
    "sales_9_month": "80",
    "min_bank": "5",
    "pieces_past_due": "0",
    "perf_6_month_avg": "0.9",
    "perf_12_month_avg": "0.85",
    "local_bo_qty": "0",
    "potential_issue": "No",
    "deck_risk": "Yes",
    "oe_constraint": "No",
    "ppap_risk": "No",
    "stop_auto_buy": "Yes",
    "rev_stop": "No",
    LABEL: "No",
}


def frame(*changes: dict[str, str]) -> pd.DataFrame:
    rows = [{**GOOD, **c} for c in changes]
    out = pd.DataFrame(rows, dtype="string")
    out.index = pd.RangeIndex(1, len(rows) + 1)
    return out


def reasons(chunk_rejects: pd.DataFrame) -> dict[int, str]:
    return dict(zip(chunk_rejects["row_number"], chunk_rejects["reason"], strict=True))


def test_a_clean_row_is_typed_and_kept() -> None:
    checked = validate_chunk(frame({}), require_label=True)
    assert checked.rejects.empty
    row = checked.rows.iloc[0]
    assert row["national_inv"] == 12.0 and row["deck_risk"] == 1.0 and row[LABEL] == 0.0
    assert row["sku"] == "1043"
    assert list(checked.rows.columns) == ["sku", *NUMERIC_COLUMNS, *FLAG_COLUMNS, LABEL]


@pytest.mark.parametrize(
    "change",
    [
        {"lead_time": ""},
        {"perf_6_month_avg": "-99", "perf_12_month_avg": "-99.0"},
        {"perf_6_month_avg": "", "perf_12_month_avg": ""},  # preprocessed layout: NaN = -99
        {"national_inv": "-25"},  # owed to customers
        {LABEL: "1"},
        {LABEL: "0.0"},
        {LABEL: "Yes"},
        {"deck_risk": " yes "},
        {"deck_risk": "N"},
        {"national_inv": "1e3"},
        {"sku": ""},
    ],
)
def test_legitimate_values_are_scored_not_rejected(change: dict[str, str]) -> None:
    checked = validate_chunk(frame(change), require_label=True)
    assert checked.rejects.empty, reasons(checked.rejects)
    assert len(checked.rows) == 1


def test_perf_sentinel_becomes_missing() -> None:
    checked = validate_chunk(frame({"perf_6_month_avg": "-99"}), require_label=True)
    assert np.isnan(checked.rows["perf_6_month_avg"].iloc[0])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"national_inv": "abc"}, "national_inv: not a number: 'abc'"),
        ({"deck_risk": "Maybe"}, "deck_risk: unknown flag value 'Maybe' (expected Yes or No)"),
        ({"lead_time": "-2"}, "lead_time: below the minimum 0"),
        ({"perf_6_month_avg": "1.5"}, "perf_6_month_avg: outside [0, 1]"),
        ({"perf_12_month_avg": "-1"}, "perf_12_month_avg: outside [0, 1]"),
        ({"sales_1_month": "inf"}, "sales_1_month: infinite value"),
        ({"forecast_3_month": "-Infinity"}, "forecast_3_month: infinite value"),
        ({"national_inv": ""}, "national_inv: missing value"),
        ({"rev_stop": ""}, "rev_stop: missing value"),
        ({LABEL: "maybe"}, "went_on_backorder: unknown label 'maybe'"),
        ({LABEL: ""}, "went_on_backorder: missing value"),
    ],
)
def test_row_problems_are_rejected_with_a_reason(change: dict[str, str], expected: str) -> None:
    checked = validate_chunk(frame({}, change, {}), require_label=True)
    assert list(checked.rows.index) == [1, 3]
    found = reasons(checked.rejects)
    assert list(found) == [2]
    assert expected in found[2]


def test_every_violation_of_a_row_is_reported() -> None:
    checked = validate_chunk(
        frame({"national_inv": "x", "lead_time": "-1", "deck_risk": "?", "perf_6_month_avg": "7"}),
        require_label=True,
    )
    reason = checked.rejects["reason"].iloc[0]
    for column in ("national_inv", "lead_time", "deck_risk", "perf_6_month_avg"):
        assert column in reason
    assert reason.count(";") == 3


def test_rejects_keep_original_fields() -> None:
    checked = validate_chunk(frame({}, {"national_inv": "12 units"}), require_label=True)
    reject = checked.rejects.iloc[0]
    assert reject["row_number"] == 2
    assert reject["national_inv"] == "12 units"
    assert reject["sku"] == "1043"


def test_row_count_footer_is_rejected_alone() -> None:
    footer = {c: "" for c in GOOD} | {"sku": "(1687860 rows)"}
    checked = validate_chunk(frame({}, footer), require_label=True)
    assert reasons(checked.rejects) == {2: "row-count footer such as '(N rows)', not a data row"}


def test_label_is_optional_when_scoring() -> None:
    raw = frame({}).drop(columns=[LABEL])
    checked = validate_chunk(raw, require_label=False)
    assert checked.rejects.empty and LABEL not in checked.rows.columns
    # A bad label does not stop a row from being scored.
    checked = validate_chunk(frame({LABEL: "??"}), require_label=False)
    assert checked.rejects.empty


def test_typed_parquet_columns_are_accepted() -> None:
    raw = frame({}, {"lead_time": ""})
    typed = raw.copy()
    for column in NUMERIC_COLUMNS:
        typed[column] = pd.to_numeric(raw[column])
    typed["deck_risk"] = [True, False]
    checked = validate_chunk(typed, require_label=True)
    assert checked.rejects.empty
    assert checked.rows["deck_risk"].tolist() == [1.0, 0.0]
    assert np.isnan(checked.rows["lead_time"].iloc[1])


def test_negative_quantities_are_scored_but_counted() -> None:
    checked = validate_chunk(frame({"sales_1_month": "-3"}), require_label=True)
    assert checked.rejects.empty
    assert checked.warnings == {"sales_1_month negative (scored as given)": 1}


def test_docs_show_the_contract_as_the_code_defines_it() -> None:
    # The docs site's hook (docs/hooks.py, run by `mkdocs build`) renders the page.
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    source = (ROOT / "docs" / hooks.CONTRACT_PAGE).read_text(encoding="utf-8")
    assert "| column |" not in source, "the table is generated, never copied by hand"
    page = hooks.render_contract_page(source)
    assert contract_markdown() in page
    for column in FEATURE_COLUMNS:
        assert re.search(rf"`{column}`", page)
