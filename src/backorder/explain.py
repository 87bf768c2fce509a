"""Per-row reasons: which features pushed a SKU's risk up or down, worded for a planner.

Contributions come from ``Scorer.contributions``: path attributions (Saabas) by default, or
exact TreeSHAP with ``reason_method: shap``; either way scaled by the calibration slope, so a
row's contributions add up to its calibrated log-odds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from backorder.features import FLAG_FEATURES

PLANNER_LABELS: dict[str, str] = {
    "national_inv": "stock on hand",
    "lead_time": "lead time (weeks)",
    "in_transit_qty": "units in transit",
    "forecast_3_month": "3-month forecast",
    "forecast_6_month": "6-month forecast",
    "forecast_9_month": "9-month forecast",
    "sales_1_month": "sales last month",
    "sales_3_month": "sales last 3 months",
    "sales_6_month": "sales last 6 months",
    "sales_9_month": "sales last 9 months",
    "min_bank": "minimum stock level",
    "pieces_past_due": "units past due from supplier",
    "perf_6_month_avg": "supplier on-time rate (6 months)",
    "perf_12_month_avg": "supplier on-time rate (12 months)",
    "local_bo_qty": "units already on local backorder",
    "potential_issue": "supplier issue flagged",
    "deck_risk": "deck risk flag",
    "oe_constraint": "OE constraint flag",
    "ppap_risk": "PPAP risk flag",
    "stop_auto_buy": "auto-buy stopped",
    "rev_stop": "revision stop flag",
    "stock_position": "stock on hand + in transit",
    "projected_stock_at_lead_time": "projected stock at end of lead time",
    "forecast_coverage_months": "months of forecast covered",
    "sales_coverage_months": "months of sales covered",
    "min_bank_gap": "stock on hand minus minimum level",
    "sales_momentum_1_vs_3": "sales trend (last month vs 3-month avg)",
    "sales_momentum_3_vs_9": "sales trend (3 vs 9 months)",
    "sales_momentum_6_vs_9": "sales trend (6 vs 9 months)",
    "forecast_trend_3_vs_9": "forecast trend (3 vs 9 months)",
    "forecast_bias": "forecast vs realised sales",
    "supplier_performance_trend": "supplier on-time trend (6 vs 12 months)",
    "past_due_share_of_forecast": "past-due and backordered units vs forecast",
    "in_transit_share": "share of stock still in transit",
    "lead_time_unknown": "lead time unknown",
    "supplier_history_missing": "no supplier performance history",
}
RATE_FEATURES = frozenset(
    {"perf_6_month_avg", "perf_12_month_avg", "supplier_performance_trend", "in_transit_share"}
)
LOG_RATIO_FEATURES = frozenset(
    {
        "sales_momentum_1_vs_3",
        "sales_momentum_3_vs_9",
        "sales_momentum_6_vs_9",
        "forecast_trend_3_vs_9",
        "forecast_bias",
        "past_due_share_of_forecast",
    }
)


def _value_text(feature: str, value: float) -> str:
    if feature in FLAG_FEATURES:
        return "yes" if value >= 0.5 else "no"
    if np.isnan(value):
        return "unknown"
    if feature in RATE_FEATURES:
        return f"{value:+.0%}" if feature == "supplier_performance_trend" else f"{value:.0%}"
    if feature in LOG_RATIO_FEATURES:
        return f"x{np.exp(value):.2f}"
    if feature.endswith("_months"):
        return f"{value:,.1f}"
    return f"{value:,.0f}"


def reason_text(feature: str, value: float, contribution: float) -> str:
    label = PLANNER_LABELS.get(feature, feature)
    direction = "raises" if contribution > 0 else "lowers"
    return f"{label} = {_value_text(feature, value)} {direction} risk"


def _largest(matrix: np.ndarray, k: int) -> np.ndarray:
    """Per row, the column indices of the ``k`` largest absolute values, largest first."""
    k = min(k, matrix.shape[1])
    top = np.argpartition(-np.abs(matrix), kth=k - 1, axis=1)[:, :k]
    picked = np.take_along_axis(matrix, top, axis=1)
    order = np.argsort(-np.abs(picked), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def _top_k(
    contributions: pd.DataFrame, features: pd.DataFrame, k: int
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Feature names, contributions, values, and per row the column indices of the ``k``
    largest absolute contributions, largest first."""
    names = [c for c in contributions.columns if c != "baseline"]
    matrix = contributions[names].to_numpy()
    values = features[names].to_numpy(dtype="float64")
    return names, matrix, values, _largest(matrix, k)


def reason_names(k: int) -> list[str]:
    """Column names of the reasons: ``reason_1`` .. ``reason_k``."""
    return [f"reason_{rank + 1}" for rank in range(k)]


def reason_columns(contributions: pd.DataFrame, features: pd.DataFrame, k: int) -> pd.DataFrame:
    """``reason_1`` .. ``reason_k`` as planner sentences, grouped per feature."""
    names, matrix, values, top = _top_k(contributions, features, k)
    out = {}
    for rank, name in enumerate(reason_names(top.shape[1])):
        column = np.empty(len(matrix), dtype=object)
        for j in np.unique(top[:, rank]):
            rows = np.flatnonzero(top[:, rank] == j)
            column[rows] = [
                reason_text(names[j], v, c)
                for v, c in zip(values[rows, j], matrix[rows, j], strict=True)
            ]
        out[name] = pd.array(column, dtype="string")
    return pd.DataFrame(out, index=contributions.index)


@dataclass(frozen=True)
class Reason:
    """One driver of one row's risk: the feature, its share of the log-odds, and the sentence."""

    feature: str
    contribution: float
    text: str


def top_reasons(
    names: list[str], matrix: np.ndarray, values: np.ndarray, k: int
) -> list[list[Reason]]:
    """Per row, the ``k`` largest drivers as structured reasons (the API's form of the
    reason columns); ``matrix`` (contributions) and ``values`` are rows x ``names``."""
    return [
        [
            Reason(names[j], float(matrix[i, j]), reason_text(names[j], values[i, j], matrix[i, j]))
            for j in top
        ]
        for i, top in enumerate(_largest(matrix, k))
    ]
