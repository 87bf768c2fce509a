"""Metrics: how good a model is, in the terms a planner acts on.

Everything here is a pure function of labels, probabilities and the validated rows: ranking
quality (ROC AUC, average precision), calibration (Brier, log loss, reliability, expected vs
actual backorders), the decision at the threshold, recall at alert budgets, expected cost next to
two baselines, and the same per segment of the catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    log_loss,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from backorder.contract import FLAG_COLUMNS

RELIABILITY_EDGES = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)
SMALL_VOLUME_UNITS = 100  # 9-month sales below this count as a small-volume SKU


def budget_key(budget: float) -> str:
    """'top_1pct' for 0.01, 'top_2_5pct' for 0.025."""
    return "top_" + f"{budget * 100:g}".replace(".", "_") + "pct"


def stock_rule_flags(rows: pd.DataFrame) -> np.ndarray:
    """The simple planner's rule: stock on hand plus in transit below the 3-month forecast."""
    position = rows["national_inv"] + rows["in_transit_qty"]
    return (position < rows["forecast_3_month"]).to_numpy()


# Not sklearn's confusion_matrix and precision_recall_fscore_support: 100x slower, per segment.
def _decision_counts(y: np.ndarray, flagged: np.ndarray) -> dict[str, float]:
    tp = int((flagged & (y == 1)).sum())
    fp = int((flagged & (y == 0)).sum())
    fn = int((~flagged & (y == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "flagged": int(flagged.sum()),
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def _cost(counts: dict[str, float], cost_missed: float, cost_false_alarm: float) -> float:
    return float(
        cost_missed * counts["false_negatives"] + cost_false_alarm * counts["false_positives"]
    )


def alert_budget_points(
    y: np.ndarray, probability: np.ndarray, budgets: list[float]
) -> dict[str, dict[str, float]]:
    """Precision and recall when only the riskiest share of SKUs is reviewed."""
    order = np.argsort(-probability, kind="stable")
    positives = max(int(y.sum()), 1)
    points = {}
    for budget in budgets:
        n_flagged = max(1, int(np.ceil(budget * len(y))))
        caught = int(y[order[:n_flagged]].sum())
        points[budget_key(budget)] = {
            "budget": budget,
            "flagged": n_flagged,
            "probability_cutoff": float(probability[order[n_flagged - 1]]),
            "precision": caught / n_flagged,
            "recall": caught / positives,
        }
    return points


def reliability_table(y: np.ndarray, probability: np.ndarray) -> pd.DataFrame:
    """Observed backorder rate against mean predicted probability, per probability bin."""
    # Not sklearn's calibration_curve: it bins uniformly or by quantile, not on these fixed edges.
    labels = [f"{lo:g} to {hi:g}" for lo, hi in pairwise(RELIABILITY_EDGES)]
    bins = pd.cut(probability, RELIABILITY_EDGES, include_lowest=True, labels=labels)
    table = (
        pd.DataFrame({"bin": bins, "y": y, "p": probability})
        .groupby("bin", observed=True)
        .agg(rows=("y", "size"), mean_predicted=("p", "mean"), observed_rate=("y", "mean"))
        .reset_index()
    )
    table["bin"] = table["bin"].astype(str)
    return table


@dataclass
class Evaluation:
    """Metrics plus the curves a report draws."""

    metrics: dict[str, Any]
    segments: pd.DataFrame
    reliability: pd.DataFrame
    cost_curve: pd.DataFrame
    y: np.ndarray
    probability: np.ndarray


def _ranking(y: np.ndarray, probability: np.ndarray) -> dict[str, float | None]:
    if 0 < y.sum() < len(y):
        return {
            "roc_auc": float(roc_auc_score(y, probability)),
            "average_precision": float(average_precision_score(y, probability)),
        }
    return {"roc_auc": None, "average_precision": None}


def cost_curve(
    y: np.ndarray, probability: np.ndarray, cost_missed: float, cost_false_alarm: float
) -> pd.DataFrame:
    """Expected total cost for thresholds on a log grid."""
    # Not sklearn's confusion_matrix per threshold: one sort and searchsorted give all 120.
    grid = np.unique(np.r_[np.geomspace(1e-4, 1.0, 120)])
    order = np.sort(probability)
    n = len(order)
    pos_sorted = np.sort(probability[y == 1])
    flagged = n - np.searchsorted(order, grid, side="left")
    tp = len(pos_sorted) - np.searchsorted(pos_sorted, grid, side="left")
    fp = flagged - tp
    fn = len(pos_sorted) - tp
    return pd.DataFrame(
        {"threshold": grid, "cost": cost_missed * fn + cost_false_alarm * fp, "flagged": flagged}
    )


def segment_masks(rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """Catalogue segments a planner asks about; each mask selects rows of ``rows``."""
    demand = rows["sales_9_month"]
    masks = {
        "all rows": np.ones(len(rows), dtype=bool),
        "lead_time missing": rows["lead_time"].isna().to_numpy(),
        "lead_time known": rows["lead_time"].notna().to_numpy(),
        "no supplier history (perf -99)": rows["perf_6_month_avg"].isna().to_numpy(),
        "stock on hand <= 0": (rows["national_inv"] <= 0).to_numpy(),
        "stock on hand > 0": (rows["national_inv"] > 0).to_numpy(),
        "low stock (position < 3-month forecast)": stock_rule_flags(rows),
        "high stock (position >= 3-month forecast)": ~stock_rule_flags(rows),
        f"small volume (9-month sales < {SMALL_VOLUME_UNITS})": (
            demand < SMALL_VOLUME_UNITS
        ).to_numpy(),
        f"large volume (9-month sales >= {SMALL_VOLUME_UNITS})": (
            demand >= SMALL_VOLUME_UNITS
        ).to_numpy(),
    }
    for flag in FLAG_COLUMNS:
        masks[f"{flag} = Yes"] = (rows[flag] == 1).to_numpy()
    # Inputs can differ in backorder rate (a prior shift): expected vs actual per input shows it.
    if "source" in rows.columns and rows["source"].nunique() > 1:
        for source in rows["source"].unique():
            masks[f"input {Path(str(source)).name}"] = (rows["source"] == source).to_numpy()
    return masks


def segment_metrics(
    rows: pd.DataFrame, y: np.ndarray, probability: np.ndarray, threshold: float
) -> pd.DataFrame:
    records = []
    for name, mask in segment_masks(rows).items():
        ys, ps = y[mask], probability[mask]
        counts = _decision_counts(ys, ps >= threshold) if len(ys) else None
        records.append(
            {
                "segment": name,
                "rows": int(mask.sum()),
                "backorders": int(ys.sum()),
                "backorder_rate": float(ys.mean()) if len(ys) else None,
                "mean_probability": float(ps.mean()) if len(ps) else None,
                **_ranking(ys, ps),
                "precision_at_threshold": counts["precision"] if counts else None,
                "recall_at_threshold": counts["recall"] if counts else None,
            }
        )
    return pd.DataFrame.from_records(records)


@dataclass(frozen=True)
class Costs:
    """The business terms predictions are judged by: what a missed backorder and a false alarm
    cost, and the alert budgets (shares of SKUs reviewed) to report precision and recall at."""

    missed: float
    false_alarm: float
    alert_budgets: list[float]


def evaluate_predictions(
    rows: pd.DataFrame,
    y: np.ndarray,
    probability: np.ndarray,
    threshold: float,
    costs: Costs,
) -> Evaluation:
    """All metrics for labels ``y`` and calibrated probabilities on validated ``rows``."""
    cost_missed, cost_false_alarm = costs.missed, costs.false_alarm
    alert_budgets = costs.alert_budgets
    y = np.asarray(y).astype(np.int64)
    probability = np.asarray(probability, dtype="float64")
    n_positive = int(y.sum())
    at_threshold = _decision_counts(y, probability >= threshold)
    never = _decision_counts(y, np.zeros(len(y), dtype=bool))
    rule = _decision_counts(y, stock_rule_flags(rows))
    budgets = alert_budget_points(y, probability, alert_budgets)
    metrics: dict[str, Any] = {
        "n_rows": len(y),
        "n_positive": n_positive,
        "positive_rate": n_positive / len(y) if len(y) else 0.0,
        **_ranking(y, probability),
        "brier": float(brier_score_loss(y, probability)) if len(y) else None,
        "log_loss": float(log_loss(y, probability, labels=[0, 1])) if len(y) else None,
        "expected_backorders": float(probability.sum()),
        "actual_backorders": n_positive,
        "threshold": threshold,
        "precision": at_threshold["precision"],
        "recall": at_threshold["recall"],
        "f1": at_threshold["f1"],
        "flagged": at_threshold["flagged"],
        "expected_cost": _cost(at_threshold, cost_missed, cost_false_alarm),
        "cost_missed_backorder": cost_missed,
        "cost_false_alarm": cost_false_alarm,
        "alert_budgets": budgets,
        "baselines": {
            "never_backorder": {
                **never,
                "expected_cost": _cost(never, cost_missed, cost_false_alarm),
            },
            "stock_rule": {
                "rule": "national_inv + in_transit_qty < forecast_3_month",
                **rule,
                "expected_cost": _cost(rule, cost_missed, cost_false_alarm),
            },
        },
    }
    for key, point in budgets.items():
        metrics[f"recall_at_{key}"] = point["recall"]
        metrics[f"precision_at_{key}"] = point["precision"]
    return Evaluation(
        metrics=metrics,
        segments=segment_metrics(rows, y, probability, threshold),
        reliability=reliability_table(y, probability),
        cost_curve=cost_curve(y, probability, cost_missed, cost_false_alarm),
        y=y,
        probability=probability,
    )


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric top-level metrics plus baselines' costs, for MLflow."""
    flat = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v is not None}
    for name, baseline in metrics.get("baselines", {}).items():
        flat[f"baseline_{name}_expected_cost"] = float(baseline["expected_cost"])
        flat[f"baseline_{name}_recall"] = float(baseline["recall"])
    return flat


def curves(y: np.ndarray, probability: np.ndarray) -> dict[str, np.ndarray]:
    fpr, tpr, _ = roc_curve(y, probability)
    precision, recall, _ = precision_recall_curve(y, probability)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}
