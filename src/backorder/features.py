"""Derived features a planner would recognise, as a scikit-learn transformer.

The transformer is stateless (it learns nothing from data), so computing it before the
cross-validation split cannot leak labels; it still lives in the fitted Pipeline so that every
consumer scores a model with exactly the features it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin

from backorder.contract import FEATURE_COLUMNS, FLAG_COLUMNS

WEEKS_PER_MONTH = 52.0 / 12.0  # lead_time is in weeks; forecasts and sales are in months


def _ratio(numerator: pd.Series, denominator: pd.Series) -> pd.Series:
    """numerator / denominator, NaN where the denominator is 0 (no demand, nothing to cover)."""
    return numerator / denominator.where(denominator != 0)


def _log_ratio(numerator: pd.Series, denominator: pd.Series) -> pd.Series:
    """log((1 + a) / (1 + b)) for non-negative volumes: 0 when equal, defined at zero."""
    return np.log1p(numerator.clip(lower=0)) - np.log1p(denominator.clip(lower=0))


@dataclass(frozen=True)
class DerivedFeature:
    name: str
    meaning: str
    compute: Callable[[pd.DataFrame], pd.Series]


def _stock_position(x: pd.DataFrame) -> pd.Series:
    return x["national_inv"] + x["in_transit_qty"]


DERIVED_FEATURES: tuple[DerivedFeature, ...] = (
    DerivedFeature("stock_position", "Stock on hand plus in transit (units)", _stock_position),
    DerivedFeature(
        "projected_stock_at_lead_time",
        "Stock position minus forecast demand over the lead time (units)",
        lambda x: (
            _stock_position(x) - x["forecast_3_month"] / 3.0 * (x["lead_time"] / WEEKS_PER_MONTH)
        ),
    ),
    DerivedFeature(
        "forecast_coverage_months",
        "Months of forecast demand covered by the stock position",
        lambda x: _ratio(_stock_position(x), x["forecast_3_month"] / 3.0),
    ),
    DerivedFeature(
        "sales_coverage_months",
        "Months of recent sales covered by the stock position",
        lambda x: _ratio(_stock_position(x), x["sales_3_month"] / 3.0),
    ),
    DerivedFeature(
        "min_bank_gap",
        "Stock on hand minus the minimum recommended stock (units)",
        lambda x: x["national_inv"] - x["min_bank"],
    ),
    DerivedFeature(
        "sales_momentum_1_vs_3",
        "Last month's sales against the 3-month monthly average (log ratio)",
        lambda x: _log_ratio(x["sales_1_month"] * 3.0, x["sales_3_month"]),
    ),
    DerivedFeature(
        "sales_momentum_3_vs_9",
        "3-month sales against the 9-month average, per month (log ratio)",
        lambda x: _log_ratio(x["sales_3_month"] * 3.0, x["sales_9_month"]),
    ),
    DerivedFeature(
        "sales_momentum_6_vs_9",
        "6-month sales against the 9-month average, per month (log ratio)",
        lambda x: _log_ratio(x["sales_6_month"] * 1.5, x["sales_9_month"]),
    ),
    DerivedFeature(
        "forecast_trend_3_vs_9",
        "3-month forecast against the 9-month forecast, per month (log ratio)",
        lambda x: _log_ratio(x["forecast_3_month"] * 3.0, x["forecast_9_month"]),
    ),
    DerivedFeature(
        "forecast_bias",
        "3-month forecast against 3-month realised sales (log ratio)",
        lambda x: _log_ratio(x["forecast_3_month"], x["sales_3_month"]),
    ),
    DerivedFeature(
        "supplier_performance_trend",
        "Supplier performance, last 6 months minus last 12 months",
        lambda x: x["perf_6_month_avg"] - x["perf_12_month_avg"],
    ),
    DerivedFeature(
        "past_due_share_of_forecast",
        "Pieces past due plus local backorders against the 3-month forecast (log ratio)",
        lambda x: _log_ratio(x["pieces_past_due"] + x["local_bo_qty"], x["forecast_3_month"]),
    ),
    DerivedFeature(
        "in_transit_share",
        "Share of the stock position that is still in transit",
        lambda x: _ratio(x["in_transit_qty"], _stock_position(x).clip(lower=0)),
    ),
    DerivedFeature(
        "lead_time_unknown",
        "Lead time is missing (1/0)",
        lambda x: x["lead_time"].isna().astype("float64"),
    ),
    DerivedFeature(
        "supplier_history_missing",
        "No supplier performance history (1/0)",
        lambda x: x["perf_6_month_avg"].isna().astype("float64"),
    ),
)


class InventoryFeatures(TransformerMixin, BaseEstimator):
    """Turns the 21 contract features into the model's feature matrix.

    Parameters
    ----------
    derived:
        Names of derived features to add (see ``DERIVED_FEATURES``); ``None`` adds all of them,
        an empty tuple keeps only the raw contract features.
    """

    def __init__(self, derived: tuple[str, ...] | None = None) -> None:
        self.derived = derived

    def _selected(self) -> list[DerivedFeature]:
        if self.derived is None:
            return list(DERIVED_FEATURES)
        known = {d.name: d for d in DERIVED_FEATURES}
        unknown = [name for name in self.derived if name not in known]
        if unknown:
            raise ValueError(f"unknown derived feature(s): {', '.join(unknown)}")
        return [known[name] for name in self.derived]

    def fit(self, X: pd.DataFrame, y: object = None) -> InventoryFeatures:
        missing = [c for c in FEATURE_COLUMNS if c not in X.columns]
        if missing:
            raise ValueError(f"missing feature column(s): {', '.join(missing)}")
        self.feature_names_out_ = list(FEATURE_COLUMNS) + [d.name for d in self._selected()]
        return self

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        base = X.loc[:, list(FEATURE_COLUMNS)]
        if not (base.dtypes == "float64").all():  # validated rows already are: skip the copy
            base = base.astype("float64")
        if self.derived is not None and not self.derived:
            return base  # the default: the contract columns only
        derived = {d.name: d.compute(base).astype("float64") for d in self._selected()}
        return pd.concat([base, pd.DataFrame(derived, index=base.index)], axis=1)

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        return np.asarray(self.feature_names_out_, dtype=object)


FLAG_FEATURES = frozenset(FLAG_COLUMNS) | {"lead_time_unknown", "supplier_history_missing"}
