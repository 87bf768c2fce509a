"""Self-contained HTML reports: every plot is an inline PNG, no external assets."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from backorder.metrics import Evaluation, curves, stock_rule_flags
from backorder.model import Scorer

# Rows used for the mean-|contribution| plot: contributions cost several times a prediction.
CONTRIBUTION_SAMPLE = 2_000

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;
max-width:1100px;color:#1d2330;line-height:1.45}
h1{font-size:1.6rem}
h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
td,th{border:1px solid #dde;padding:.25rem .55rem;text-align:right}
th{background:#f3f5fa}td:first-child,th:first-child{text-align:left}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1rem}.grid img{width:100%}
.note{color:#556;font-size:.9rem}.kpi{display:flex;gap:1rem;flex-wrap:wrap}
.kpi div{background:#f3f5fa;border-radius:6px;padding:.6rem 1rem}
.kpi b{display:block;font-size:1.3rem}
"""


def _png(fig: plt.Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        number = float(value)
        return f"{number:,.4f}" if abs(number) < 1000 else f"{number:,.0f}"
    return html.escape(str(value))


def table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    return table(pd.DataFrame(list(pairs), columns=["", "value"]))


def _roc_plot(ev: Evaluation, rows: pd.DataFrame) -> str:
    c = curves(ev.y, ev.probability)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.plot(c["fpr"], c["tpr"], label=f"model (AUC {ev.metrics['roc_auc']:.3f})")
    rule = stock_rule_flags(rows)
    positives, negatives = max(ev.y.sum(), 1), max((1 - ev.y).sum(), 1)
    ax.scatter(
        [(rule & (ev.y == 0)).sum() / negatives],
        [(rule & (ev.y == 1)).sum() / positives],
        color="C3",
        zorder=3,
        label="stock rule",
    )
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="chance")
    ax.set(xlabel="false-alarm rate", ylabel="share of backorders caught", title="ROC")
    ax.legend(loc="lower right")
    return _png(fig, "ROC curve")


def _pr_plot(ev: Evaluation) -> str:
    c = curves(ev.y, ev.probability)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.plot(c["recall"], c["precision"], label=f"model (AP {ev.metrics['average_precision']:.3f})")
    ax.axhline(ev.metrics["positive_rate"], ls=":", color="grey", label="base rate")
    for point in ev.metrics["alert_budgets"].values():
        ax.scatter([point["recall"]], [point["precision"]], zorder=3)
        ax.annotate(
            f"top {point['budget']:.0%}",
            (point["recall"], point["precision"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set(xlabel="recall", ylabel="precision", title="Precision–recall", ylim=(0, 1.02))
    ax.legend(loc="upper right")
    return _png(fig, "Precision-recall curve")


def _reliability_plot(ev: Evaluation) -> str:
    rel = ev.reliability
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.plot([1e-4, 1], [1e-4, 1], ls=":", color="grey", label="perfect calibration")
    ax.scatter(
        rel["mean_predicted"],
        rel["observed_rate"].clip(lower=1e-4),
        s=np.sqrt(rel["rows"]) * 2,
        label="bins (area ~ rows)",
    )
    ax.plot(rel["mean_predicted"], rel["observed_rate"].clip(lower=1e-4))
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="mean predicted probability",
        ylabel="observed backorder rate",
        title="Reliability",
    )
    ax.legend(loc="upper left")
    return _png(fig, "Reliability curve (calibration)")


def _cost_plot(ev: Evaluation) -> str:
    cc = ev.cost_curve
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.plot(cc["threshold"], cc["cost"], label="model")
    never = ev.metrics["baselines"]["never_backorder"]["expected_cost"]
    rule = ev.metrics["baselines"]["stock_rule"]["expected_cost"]
    ax.axhline(never, ls="--", color="C1", label="never backorder")
    ax.axhline(rule, ls="--", color="C3", label="stock rule")
    ax.axvline(ev.metrics["threshold"], ls=":", color="black", label="chosen threshold")
    ax.set(xscale="log", xlabel="threshold", ylabel="expected cost", title="Cost vs threshold")
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig, "Cost vs threshold")


def _importance_plot(importance: pd.Series, title: str) -> str:
    top = importance.head(20)[::-1]
    fig, ax = plt.subplots(figsize=(5, 5.5))
    ax.barh(top.index, top.to_numpy() / max(top.sum(), 1e-12))
    ax.set(xlabel="share of total", title=title)
    return _png(fig, title)


def mean_abs_contribution(model: Scorer, rows: pd.DataFrame) -> pd.Series:
    """Mean |contribution| per feature on a fixed random sample of ``rows``."""
    sample = rows.sample(min(len(rows), CONTRIBUTION_SAMPLE), random_state=0)
    contributions = model.contributions(model.features(sample)).drop(columns="baseline")
    return contributions.abs().mean().sort_values(ascending=False)


def evaluation_sections(ev: Evaluation, rows: pd.DataFrame, model: Scorer) -> str:
    """Headline figures, decisions, curves, calibration, drivers and segments of one evaluation."""
    m = ev.metrics
    importance = model.feature_importance()
    contribution = mean_abs_contribution(model, rows)
    kpis = "".join(
        f"<div>{label}<b>{_fmt(value)}</b></div>"
        for label, value in [
            ("ROC AUC", m["roc_auc"]),
            ("average precision", m["average_precision"]),
            ("recall at threshold", m["recall"]),
            ("precision at threshold", m["precision"]),
            (
                "expected / actual backorders",
                f"{m['expected_backorders']:,.0f} / {m['actual_backorders']:,}",
            ),
        ]
    )
    budgets = pd.DataFrame(
        [
            {
                "review the riskiest": f"{p['budget']:.0%}",
                "SKUs": p["flagged"],
                "probability cut-off": p["probability_cutoff"],
                "precision": p["precision"],
                "recall": p["recall"],
            }
            for p in m["alert_budgets"].values()
        ]
    )
    baselines = pd.DataFrame(
        [
            {
                "policy": f"model at threshold {m['threshold']:.4f}",
                "flagged": m["flagged"],
                "precision": m["precision"],
                "recall": m["recall"],
                "expected cost": m["expected_cost"],
            },
            *[
                {
                    "policy": name.replace("_", " "),
                    "flagged": b["flagged"],
                    "precision": b["precision"],
                    "recall": b["recall"],
                    "expected cost": b["expected_cost"],
                }
                for name, b in m["baselines"].items()
            ],
        ]
    )
    importance_plots = _importance_plot(importance, "Feature importance (gain)")
    importance_plots += _importance_plot(
        contribution, f"Mean |contribution| to log-odds ({CONTRIBUTION_SAMPLE:,}-row sample)"
    )
    return f"""
<div class="kpi">{kpis}</div>
<h2>Decision and alert budgets</h2>
<p class="note">Costs: a missed backorder costs {m["cost_missed_backorder"]:g}, a false alarm
{m["cost_false_alarm"]:g}. The threshold minimises their expected total on validation data.</p>
{table(baselines)}
{table(budgets)}
<h2>Curves</h2>
<div class="grid">{_roc_plot(ev, rows)}{_pr_plot(ev)}{_reliability_plot(ev)}{_cost_plot(ev)}</div>
<h2>Calibration</h2>
<p class="note">Brier {_fmt(m["brier"])}, log loss {_fmt(m["log_loss"])}. Sum of probabilities
{m["expected_backorders"]:,.1f} against {m["actual_backorders"]:,} actual backorders.</p>
{table(ev.reliability)}
<h2>What drives the model</h2>
<div class="grid">{importance_plots}</div>
<h2>Segments</h2>
{table(ev.segments)}
"""


def render(title: str, intro_pairs: list[tuple[str, Any]], body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
{key_values(intro_pairs)}
{body}
</body></html>
"""
